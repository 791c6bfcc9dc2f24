// The client against a real server: the `destinations` binary on 127.0.0.1 (its path in
// DESTINATIONS_BIN, which `cargo xtask test` sets), delivering to a receiver of the test's own.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import { Client, DestinationsError } from "../dist/index.js";

const receiver = { acceptAll: false, paths: [], server: null, port: 0 };
const server = { process: null, data: null, url: null };
let client;

function url(path) {
  return `http://127.0.0.1:${receiver.port}${path}`;
}

before(async () => {
  receiver.server = createServer((request, response) => {
    request.resume();
    request.on("end", () => {
      receiver.paths.push(request.url);
      const gone = request.url.startsWith("/gone") && !receiver.acceptAll;
      response.writeHead(gone ? 410 : 200);
      response.end(gone ? "gone for now" : "ok");
    });
  });
  await new Promise((resolve) => receiver.server.listen(0, "127.0.0.1", resolve));
  receiver.port = receiver.server.address().port;

  const binary = process.env.DESTINATIONS_BIN;
  if (!binary || !existsSync(binary)) {
    throw new Error(
      "DESTINATIONS_BIN must name the destinations binary: run the client tests with `cargo xtask test`",
    );
  }
  server.data = mkdtempSync(join(tmpdir(), "destinations-ts-client-"));
  server.process = spawn(binary, ["serve", "--listen", "127.0.0.1:0", "--data-dir", server.data], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const lines = createInterface({ input: server.process.stdout });
  const first = await new Promise((resolve, reject) => {
    lines.once("line", resolve);
    server.process.once("exit", (code) => reject(new Error(`the server exited (${code})`)));
  });
  assert.match(first, /^listening on /);
  server.url = "http://" + first.slice("listening on ".length).trim();
  client = new Client(server.url);
});

after(async () => {
  if (server.process) {
    const exited = new Promise((resolve) => server.process.once("exit", resolve));
    server.process.kill("SIGTERM");
    await exited;
  }
  if (server.data) rmSync(server.data, { recursive: true, force: true });
  receiver.server?.close();
});

test("a run is delivered and its status read", async () => {
  const accepted = await client.run(
    [
      { destination: "http", payload: { url: url("/ok"), data: { n: 1 } } },
      { destination: "http", payload: { url: url("/ok"), data: "two" } },
    ],
    { runId: "ts-run" },
  );
  assert.equal(accepted.run_id, "ts-run");
  assert.equal(accepted.ids.length, 2);
  for (const id of accepted.ids) {
    const status = await client.status(id, { wait: "10s" });
    assert.equal(status.state, "delivered");
    assert.equal(status.response?.status, 200);
    assert.deepEqual(status.attempts_log?.map((a) => a.outcome), ["delivered"]);
  }
  const listed = await client.events({ run: "ts-run", state: "delivered" });
  assert.deepEqual(new Set(listed.events.map((e) => e.id)), new Set(accepted.ids));
  assert.equal(listed.next, null);
});

test("a dead letter is listed and replayed", async () => {
  const id = await client.send("http", { url: url("/gone") });
  let status = await client.status(id, { wait: "10s" });
  assert.equal(status.state, "dead");
  assert.equal(status.attempts_log?.[0].status_code, 410);
  assert.equal(status.attempts_log?.[0].response_excerpt, "gone for now");
  const letters = await client.deadLetters({ destination: "http" });
  assert.ok(letters.dead_letters.some((letter) => letter.id === id));
  receiver.acceptAll = true;
  try {
    assert.deepEqual((await client.replay({ ids: [id] })).replayed, [id]);
    status = await client.status(id, { wait: "10s" });
  } finally {
    receiver.acceptAll = false;
  }
  assert.equal(status.state, "delivered");
  assert.deepEqual(status.attempts_log?.map((a) => a.outcome), ["failed", "delivered"]);
  const after = await client.deadLetters({ destination: "http" });
  assert.ok(!after.dead_letters.some((letter) => letter.id === id));
});

test("a bad send is refused naming the field, and nothing of its run is sent", async () => {
  const before = receiver.paths.length;
  const refused = await client
    .run([
      { destination: "http", payload: { url: url("/never") } },
      { destination: "http", payload: { url: url("/x"), body: "hi" } },
    ])
    .then(() => null, (error) => error);
  assert.ok(refused instanceof DestinationsError, String(refused));
  assert.equal(refused.status, 400);
  assert.equal(refused.code, "invalid_payload");
  assert.equal(refused.field, "sends[1].payload.body");
  assert.match(refused.message, /unknown field `body`/);
  const unknown = await client.send("nowhere", { url: url("/x") }).then(() => null, (e) => e);
  assert.equal(unknown?.code, "unknown_destination");
  assert.equal(unknown?.status, 404);
  const badId = await client.status("not-an-id").then(() => null, (e) => e);
  assert.equal(badId?.code, "invalid_id");
  assert.equal(receiver.paths.length, before, "nothing of the refused run was sent");
});

test("an unreachable server is an error, not a hang", async () => {
  const error = await new Client("http://127.0.0.1:9", { timeoutMs: 5000 })
    .destinations()
    .then(() => null, (e) => e);
  assert.equal(error?.code, "unreachable");
});

test("the token stays out of the client's JSON", () => {
  const json = JSON.stringify(new Client(server.url, { token: "s3cret-token-1234567" }));
  assert.ok(!json.includes("s3cret"), json);
});
