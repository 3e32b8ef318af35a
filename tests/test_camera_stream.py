"""A live HTTP MJPEG stream on loopback that hangs: the source must notice within its stall timeout."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import pytest

from station.core.backoff import Backoff
from station.runtime.sources import CaptureSource
from station.core.simulated_line import render_frame, render_part


class HangingStream(BaseHTTPRequestHandler):
    frames_before_hang = 8
    release = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        ok, jpeg = cv2.imencode(".jpg", render_frame(render_part(1, 0), 1))
        for _ in range(self.frames_before_hang):
            self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
            self.wfile.write(jpeg.tobytes() + b"\r\n")
            self.wfile.flush()
            time.sleep(0.02)
        self.release.wait(20)  # the camera freezes: connection open, no bytes

    def log_message(self, *args):
        pass


@pytest.fixture
def stream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HangingStream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    HangingStream.release.set()
    server.shutdown()
    server.server_close()


def test_a_hanging_stream_is_noticed_and_reconnected(stream):
    source = CaptureSource(stream, "url", stall_timeout=1.0, backoff=Backoff(first=0.1, ceiling=0.2))
    frames = []
    consumer = threading.Thread(target=lambda: [frames.append(f) for f in source], daemon=True)
    consumer.start()
    try:
        deadline = time.monotonic() + 10
        while not frames and time.monotonic() < deadline:
            time.sleep(0.01)
        assert frames, "no frame from the MJPEG stream"
        first_frame_at = time.monotonic()
        while source.state != "reconnecting" and time.monotonic() < deadline:
            time.sleep(0.01)
        noticed_after = time.monotonic() - first_frame_at
        assert source.state == "reconnecting"
        assert noticed_after < 3.0, f"stall noticed only after {noticed_after:.1f} s"
        while source.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.reconnects >= 1  # the server answers again: a new connection gives frames
    finally:
        source.close()
        consumer.join(5)
    assert frames[0].source == stream and frames[0].image.ndim == 3


class ResizingStream(BaseHTTPRequestHandler):
    """An MJPEG camera that switches from 320x240 to 160x120 after 5 frames, then keeps sending."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        frame = render_frame(render_part(1, 0), 1)
        try:
            for index in range(400):
                size = (320, 240) if index < 5 else (160, 120)
                ok, jpeg = cv2.imencode(".jpg", cv2.resize(frame, size))
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
                self.wfile.write(jpeg.tobytes() + b"\r\n")
                self.wfile.flush()
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_a_live_mjpeg_stream_that_changes_its_frame_size_is_seen_at_the_new_size():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ResizingStream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    source = CaptureSource(f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg", "url")
    sizes = []
    consumer = threading.Thread(target=lambda: [sizes.append(f.image.shape[:2]) for f in source], daemon=True)
    consumer.start()
    try:
        deadline = time.monotonic() + 15
        while (120, 160) not in sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (120, 160) in sizes, f"the new size never reached the station: {set(sizes)}"
    finally:
        source.close()
        consumer.join(5)
        server.shutdown()
        server.server_close()
