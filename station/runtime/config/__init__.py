"""station.yaml, parsed once into frozen, typed models (the base model: station/core/config_model.py).

station.py       StationConfig and its sections, parse_config / load_config, the secret advice
yaml_lines.py    YAML with the line of every key, for problems worded `station.yaml:7: mqtt.port: ...`
regions.py       rois:          tiles.py         tiles:          presence.py    presence:
integrations.py  prometheus:, snapshot:, homeassistant:, opcua:        web.py   web:
forms.py         model: {FORM: PATH}, model_form:
credentials.py   the broker's and the camera's secrets, from a file or a systemd credential
"""
