#!/usr/bin/env python3
"""An SMTP server for tests, on aiosmtpd (a real, independent SMTP implementation).

It stores every accepted message in DIR as NNNNNN.eml (the DATA bytes) and NNNNNN.json (the
envelope: mail_from, rcpt_tos, login, tls). The .json is renamed into place after the .eml,
so whoever sees a .json can read both. It prints "ready" on stdout once it accepts connections.

    capture.py --port PORT --dir DIR [--cert CERT --key KEY [--implicit-tls]]
               [--login USER:PASSWORD] [--refuse RCPT_REGEX]
               [--defer RCPT_REGEX --defer-times N]

--cert/--key offer STARTTLS (or, with --implicit-tls, speak TLS from the first byte).
--login requires AUTH (PLAIN or LOGIN, after TLS) with that one account.
--refuse answers 550 to matching recipients; --defer answers 451 to the first N RCPTs of
each matching recipient, then accepts it.
"""

import argparse
import asyncio
import itertools
import json
import logging
import os
import re
import signal
import ssl
import sys
import threading
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Capture:
    def __init__(self, folder, refuse, defer, defer_times):
        self.folder = folder
        self.refuse = re.compile(refuse) if refuse else None
        self.defer = re.compile(defer) if defer else None
        self.defer_times = defer_times
        self.deferred = {}
        # A restarted server goes on numbering where the last one stopped.
        taken = [int(name[:6]) for name in os.listdir(folder) if name.endswith(".json")]
        self.numbers = itertools.count(max(taken, default=0) + 1)
        self.sessions = itertools.count(1)
        try:
            with open(os.path.join(folder, "greetings.count")) as f:
                self.greetings = int(f.read().strip() or 0)
        except OSError:
            self.greetings = 0
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # Counted (in DIR/greetings.count), so a test can tell how often a client connected.
        session.host_name = hostname
        with self.lock:
            self.greetings += 1
            count = self.greetings
        write_atomically(os.path.join(self.folder, "greetings.count"), str(count).encode())
        # aiosmtpd has already ended the list with "250 HELP".
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse and self.refuse.search(address):
            return "550 5.1.1 <%s>: recipient refused (test server)" % address
        if self.defer and self.defer.search(address):
            with self.lock:
                seen = self.deferred.get(address, 0)
                self.deferred[address] = seen + 1
            if seen < self.defer_times:
                return "451 4.3.0 <%s>: try again later (test server)" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            number = next(self.numbers)
        stem = os.path.join(self.folder, "%06d" % number)
        if not hasattr(session, "capture_session"):
            session.capture_session = next(self.sessions)
        meta = {
            "session": session.capture_session,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "login": getattr(session, "capture_login", None),
            # Set after STARTTLS and with implicit TLS alike.
            "tls": server.transport.get_extra_info("ssl_object") is not None,
        }
        write_atomically(stem + ".eml", envelope.original_content)
        write_atomically(stem + ".json", json.dumps(meta).encode())
        return "250 2.0.0 queued as %06d" % number


def write_atomically(path, data):
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def main():
    # aiosmtpd warns about its own deprecated names; the test output is not the place.
    warnings.simplefilter("ignore", DeprecationWarning)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--login")
    parser.add_argument("--refuse")
    parser.add_argument("--defer")
    parser.add_argument("--defer-times", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    handler = Capture(args.dir, args.refuse, args.defer, args.defer_times)
    options = {}
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    if tls and not args.implicit_tls:
        options["tls_context"] = tls
        options["require_starttls"] = True
    if args.login:
        user, password = args.login.split(":", 1)

        def authenticate(server, session, envelope, mechanism, data):
            ok = (
                isinstance(data, LoginPassword)
                and data.login.decode() == user
                and data.password.decode() == password
            )
            if ok:
                session.capture_login = user
            return AuthResult(success=ok, handled=False)

        options["authenticator"] = authenticate
        options["auth_required"] = True
        options["auth_require_tls"] = tls is not None
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=args.port,
        ssl_context=tls if args.implicit_tls else None,
        server_hostname="localhost",
        **options,
    )
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    sys.exit(main())
