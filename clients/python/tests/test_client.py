"""The client against a real server: the `destinations` binary on 127.0.0.1 (its path in
DESTINATIONS_BIN, which `cargo xtask test` sets), delivering to a receiver of the test's own."""

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from destinations_client import Client, DestinationsError  # noqa: E402


class Receiver:
    """An HTTP server on 127.0.0.1: 410 for /gone until `accept_all`, 200 otherwise."""

    def __init__(self):
        self.accept_all = False
        self.paths = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.paths.append(self.path)
                gone = self.path.startswith("/gone") and not receiver.accept_all
                body = b"gone for now" if gone else b"ok"
                self.send_response(410 if gone else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self):
        self.server.shutdown()


class Server:
    """`destinations serve` on embedded defaults, a free port and a data directory of its own."""

    def __init__(self):
        binary = os.environ.get("DESTINATIONS_BIN")
        if not binary or not os.path.exists(binary):
            raise RuntimeError(
                "DESTINATIONS_BIN must name the destinations binary: run the client tests "
                "with `cargo xtask test` (or `cargo build -p destinations-server` and set it)")
        self.data = tempfile.mkdtemp(prefix="destinations-python-client-")
        self.process = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}")
        self.url = "http://" + line.split("listening on ", 1)[1].strip()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data, ignore_errors=True)


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.receiver = Receiver()
        cls.server = Server()
        cls.client = Client(cls.server.url)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.receiver.stop()

    def test_a_run_is_delivered_and_its_status_read(self):
        accepted = self.client.run([
            {"destination": "http", "payload": {"url": self.receiver.url("/ok"), "data": {"n": 1}}},
            {"destination": "http", "payload": {"url": self.receiver.url("/ok"), "data": "two"}},
        ], run_id="python-run")
        self.assertEqual(accepted["run_id"], "python-run")
        self.assertEqual(len(accepted["ids"]), 2)
        for id in accepted["ids"]:
            status = self.client.status(id, wait="10s")
            self.assertEqual(status["state"], "delivered", status)
            self.assertEqual(status["response"]["status"], 200)
            self.assertEqual([a["outcome"] for a in status["attempts_log"]], ["delivered"])
        listed = self.client.events(run="python-run", state="delivered")
        self.assertEqual({e["id"] for e in listed["events"]}, set(accepted["ids"]))
        self.assertIsNone(listed["next"])

    def test_a_dead_letter_is_listed_and_replayed(self):
        id = self.client.send("http", {"url": self.receiver.url("/gone")})
        status = self.client.status(id, wait="10s")
        self.assertEqual(status["state"], "dead", status)
        self.assertEqual(status["attempts_log"][0]["status_code"], 410)
        self.assertEqual(status["attempts_log"][0]["response_excerpt"], "gone for now")
        letters = self.client.dead_letters(destination="http")["dead_letters"]
        self.assertIn(id, [letter["id"] for letter in letters])
        self.receiver.accept_all = True
        try:
            self.assertEqual(self.client.replay(ids=[id])["replayed"], [id])
            status = self.client.status(id, wait="10s")
        finally:
            self.receiver.accept_all = False
        self.assertEqual(status["state"], "delivered", status)
        self.assertEqual([a["outcome"] for a in status["attempts_log"]], ["failed", "delivered"])
        letters = self.client.dead_letters(destination="http")["dead_letters"]
        self.assertNotIn(id, [letter["id"] for letter in letters])

    def test_a_bad_send_is_refused_naming_the_field_and_nothing_of_its_run_is_sent(self):
        before = len(self.receiver.paths)
        with self.assertRaises(DestinationsError) as refused:
            self.client.run([
                {"destination": "http", "payload": {"url": self.receiver.url("/never")}},
                {"destination": "http", "payload": {"url": self.receiver.url("/x"), "body": "hi"}},
            ])
        error = refused.exception
        self.assertEqual((error.status, error.code), (400, "invalid_payload"))
        self.assertEqual(error.field, "sends[1].payload.body")
        self.assertIn("unknown field `body`", error.message)
        with self.assertRaises(DestinationsError) as unknown:
            self.client.send("nowhere", {"url": self.receiver.url("/x")})
        self.assertEqual((unknown.exception.status, unknown.exception.code),
                         (404, "unknown_destination"))
        with self.assertRaises(DestinationsError) as unknown_id:
            self.client.status("not-an-id")
        self.assertEqual(unknown_id.exception.code, "invalid_id")
        self.assertEqual(len(self.receiver.paths), before, "nothing of the refused run was sent")

    def test_an_unreachable_server_is_an_error_not_a_hang(self):
        with self.assertRaises(DestinationsError) as unreachable:
            Client("http://127.0.0.1:9", timeout=5).destinations()
        self.assertEqual(unreachable.exception.code, "unreachable")

    def test_the_token_stays_out_of_the_clients_repr(self):
        self.assertNotIn("s3cret", repr(Client(self.server.url, token="s3cret-token-1234567")))


if __name__ == "__main__":
    unittest.main()
