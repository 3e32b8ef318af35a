"""`station fit --data DIR --out BUNDLE`: from an image folder to a bundle a station runs.

data_check  unreadable images, duplicates across classes, near-duplicate groups
split       train / calibration / test, stratified, grouped, seeded
candidates  trunks within a time budget, chosen on the calibration part
bundle      export that never dead-ends, station.yaml, fit.json
figures     the test part's report pictures
report      what is printed
pipeline    run_fit: all of it in order

Uses station.core, export and calibration; only station/cli/ imports it.
"""
