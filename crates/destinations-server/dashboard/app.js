// The dashboard of a destinations server: no framework, no build step. Everything shown is
// put in the page as text (never as markup), and every call goes to this server's own API.

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const badge = (state) => el("span", { class: `badge ${state}` }, state.replace("_", " "));
const shortId = (id) => `${id.slice(0, 8)}…${id.slice(-4)}`;
const time = (text) => (text ? new Date(text).toLocaleTimeString() : "");
const dateTime = (text) => (text ? new Date(text).toLocaleString() : "");
const rate = (n) => (n >= 10 ? Math.round(n).toString() : n.toFixed(1));

class Unauthorized extends Error {}

/** Call the API; its JSON, or an error with the server's message. */
async function api(method, path, body) {
  const options = { method, headers: { accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401 && path !== "/v1/session") throw new Unauthorized();
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error(json?.error?.message ?? `${response.status}`);
    error.code = json?.error?.code;
    throw error;
  }
  return json;
}

// ---- state --------------------------------------------------------------------------------

const state = {
  view: "overview",
  /** The last few seconds of counts, newest last (rates are drawn from them). */
  history: [],
  /** A point a second for the chart: delivered and failed per second (a minute of them). */
  series: [],
  lastPoint: null,
  destinations: [],
  sendFilters: {},
  /** How many sends the list shows ("Older sends" adds 50, up to 1 000). */
  sendLimit: 50,
  selected: null,
  live: null,
  lastChange: null,
};

// ---- sign-in ------------------------------------------------------------------------------

async function start() {
  const session = await api("GET", "/v1/session");
  $("sign-out").hidden = !session.required || !session.signed_in;
  if (!session.signed_in) return showSignIn();
  $("tabs").hidden = false;
  connectLive();
  route();
}

function showSignIn(message = "") {
  if (state.live) state.live.close();
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("tabs").hidden = true;
  $("sign-out").hidden = true;
  $("live").textContent = "signed out";
  $("live").classList.remove("on");
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("token").focus();
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value;
  $("sign-in-error").textContent = "";
  try {
    await api("POST", "/v1/session", { token });
    $("token").value = "";
    $("sign-in").hidden = true;
    await start();
  } catch (error) {
    $("sign-in-error").textContent = error.message;
  }
});

$("sign-out").addEventListener("click", async () => {
  await api("DELETE", "/v1/session");
  showSignIn();
});

/** Run an action; a 401 means the session ended: ask again. */
async function guarded(action) {
  try {
    return await action();
  } catch (error) {
    if (error instanceof Unauthorized) showSignIn("Your session ended; sign in again.");
    else throw error;
  }
}

// ---- navigation ---------------------------------------------------------------------------

function route() {
  const view = (location.hash || "#overview").slice(1);
  state.view = ["overview", "sends", "dead", "endpoints"].includes(view) ? view : "overview";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== state.view;
  for (const link of document.querySelectorAll("#tabs a")) {
    link.classList.toggle("active", link.dataset.view === state.view);
  }
  refresh();
}
window.addEventListener("hashchange", () => {
  if (!$("tabs").hidden) route();
});

/** Reload the view's list: one load at a time, and one more after it if asked meanwhile. */
function refresh() {
  if (state.loading) {
    state.reloadAfter = true;
    return;
  }
  state.loading = true;
  guarded(async () => {
    if (state.view === "sends") await loadSends();
    if (state.view === "dead") await loadDead();
    if (state.view === "endpoints") await loadEndpoints();
  })
    .catch((error) => console.warn(error))
    .finally(() => {
      state.loading = false;
      if (state.reloadAfter) {
        state.reloadAfter = false;
        refresh();
      }
    });
}

// ---- live counts --------------------------------------------------------------------------

function connectLive() {
  if (state.live) state.live.close();
  const live = new EventSource("/v1/live");
  state.live = live;
  live.addEventListener("tick", (event) => tick(JSON.parse(event.data)));
  live.addEventListener("open", () => {
    $("live").textContent = "live";
    $("live").classList.add("on");
  });
  live.addEventListener("error", async () => {
    $("live").textContent = "reconnecting…";
    $("live").classList.remove("on");
    // A stream refused for want of a session ends here: ask for the token.
    const session = await api("GET", "/v1/session").catch(() => null);
    if (session && !session.signed_in) showSignIn("Your session ended; sign in again.");
  });
}

function tick(snapshot) {
  const totals = { delivered: 0, dead: 0, failed: 0, queued: 0, accepted: 0 };
  for (const d of snapshot.destinations) {
    totals.delivered += d.delivered;
    totals.dead += d.dead;
    totals.failed += d.failed_attempts;
    totals.queued += d.queued;
    totals.accepted += d.accepted;
  }
  const at = Date.parse(snapshot.time);
  state.history.push({ at, totals, destinations: snapshot.destinations });
  while (state.history.length > 2 && at - state.history[0].at > 3000) state.history.shift();
  // The counts come when they change (and each second): the chart takes a point a second.
  const last = state.lastPoint;
  if (!last || at - last.at >= 1000) {
    if (last) {
      const seconds = (at - last.at) / 1000;
      state.series.push({
        delivered: Math.max(0, (totals.delivered - last.totals.delivered) / seconds),
        failed: Math.max(0, (totals.failed - last.totals.failed) / seconds),
      });
      if (state.series.length > 60) state.series.shift();
    }
    state.lastPoint = { at, totals };
  }
  updateOverview(snapshot);
  updateDestinationChoices(snapshot.destinations);
  // Something happened: the lists on screen are reloaded (at most once a second).
  const change = `${totals.accepted}/${totals.delivered}/${totals.dead}/${totals.failed}/${totals.queued}`;
  if (change !== state.lastChange) {
    state.lastChange = change;
    if (state.view === "sends" || state.view === "dead") refresh();
    if (state.selected && state.view === "sends") showDetail(state.selected, false);
  }
  if (state.view === "endpoints") refresh();
}

/** Per second, over the last second or so of counts. */
function perSecond(pick) {
  const h = state.history;
  if (h.length < 2) return 0;
  const newest = h.at(-1);
  const older = h.findLast((s) => s.at <= newest.at - 1000) ?? h[0];
  const seconds = Math.max((newest.at - older.at) / 1000, 0.001);
  return Math.max(0, (pick(newest) - pick(older)) / seconds);
}

function updateOverview(snapshot) {
  const delivering = perSecond((s) => s.totals.delivered);
  $("stat-delivered").textContent = rate(delivering);
  // The highest rate shown, for the page's tests.
  window.__peakDelivered = Math.max(window.__peakDelivered ?? 0, delivering);
  $("stat-failed").textContent = rate(perSecond((s) => s.totals.failed));
  $("stat-queued").textContent = state.history.at(-1).totals.queued.toLocaleString();
  $("stat-dead").textContent = state.history.at(-1).totals.dead.toLocaleString();
  const body = $("destinations").tBodies[0];
  body.replaceChildren(
    ...snapshot.destinations.map((d) => {
      const of = (s, field) => s.destinations.find((x) => x.name === d.name)?.[field] ?? 0;
      return el(
        "tr",
        { "data-name": d.name },
        el("td", {}, el("strong", {}, d.name)),
        el("td", {}, d.kind),
        el("td", { class: "num" }, d.queued.toLocaleString()),
        el("td", { class: "num good" }, rate(perSecond((s) => of(s, "delivered")))),
        el("td", { class: "num bad" }, rate(perSecond((s) => of(s, "failed_attempts")))),
        el("td", { class: "num" }, d.delivered.toLocaleString()),
        el("td", { class: "num" }, d.dead.toLocaleString()),
        el("td", { class: "num" }, d.accepted.toLocaleString()),
        el(
          "td",
          { class: "error-text", title: d.last_error ? `${dateTime(d.last_error_at)}: ${d.last_error}` : "" },
          d.last_error ? `${time(d.last_error_at)} ${d.last_error}` : "",
        ),
      );
    }),
  );
  drawChart();
}

function drawChart() {
  const canvas = $("chart");
  const scale = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 1100;
  const height = canvas.clientHeight || 180;
  canvas.width = width * scale;
  canvas.height = height * scale;
  const g = canvas.getContext("2d");
  g.scale(scale, scale);
  g.clearRect(0, 0, width, height);
  const delivered = state.series.map((p) => p.delivered);
  const failed = state.series.map((p) => p.failed);
  const top = Math.max(1, ...delivered, ...failed);
  const left = 48, bottom = height - 20, right = width - 8, topY = 10;
  g.strokeStyle = "#e4e7ec";
  g.fillStyle = "#667085";
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  for (const fraction of [0, 0.5, 1]) {
    const y = bottom - (bottom - topY) * fraction;
    g.beginPath();
    g.moveTo(left, y);
    g.lineTo(right, y);
    g.stroke();
    g.fillText(rate(top * fraction), 6, y + 4);
  }
  g.fillText("60 s ago", left, height - 4);
  g.fillText("now", right - 22, height - 4);
  const line = (values, color) => {
    if (values.length === 0) return;
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    values.forEach((v, i) => {
      const x = right - (values.length - 1 - i) * ((right - left) / 60);
      const y = bottom - (bottom - topY) * (v / top);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  };
  line(delivered, "#178a4c");
  line(failed, "#c8372d");
}

function updateDestinationChoices(destinations) {
  const names = destinations.map((d) => d.name);
  if (names.join() === state.destinations.join()) return;
  state.destinations = names;
  for (const [select, first] of [[$("f-destination"), "all"], [$("replay-destination"), null]]) {
    const chosen = select.value;
    select.replaceChildren(
      ...(first ? [el("option", { value: "" }, first)] : []),
      ...names.map((name) => el("option", { value: name }, name)),
    );
    select.value = chosen && names.includes(chosen) ? chosen : select.options[0]?.value ?? "";
  }
}

// ---- sends --------------------------------------------------------------------------------

function filtersQuery() {
  const query = new URLSearchParams({ limit: String(state.sendLimit) });
  for (const [name, value] of Object.entries(state.sendFilters)) if (value) query.set(name, value);
  return query;
}

async function loadSends() {
  const page = await api("GET", `/v1/events?${filtersQuery()}`);
  const body = $("send-list").tBodies[0];
  // Rows are only rebuilt when what they show changed (nothing moves under the pointer).
  const shown = page.events.map((s) => `${s.id}:${s.state}:${s.attempts}`).join() + (page.next ?? "");
  if (shown === state.sendsShown && body.rows.length > 0) return;
  state.sendsShown = shown;
  const rows = page.events.map((s) =>
    el(
      "tr",
      { "data-id": s.id, class: state.selected === s.id ? "selected" : null, onclick: () => showDetail(s.id, true) },
      el("td", { class: "nowrap", title: dateTime(s.created_at) }, time(s.created_at)),
      el("td", { class: "mono", title: s.id }, shortId(s.id)),
      el("td", {}, s.destination),
      el("td", { class: "clip", title: s.run ?? "" }, s.run ?? ""),
      el("td", { "data-state": s.state }, badge(s.state)),
      el("td", { class: "num" }, s.attempts),
      el("td", { class: "error-text", title: s.last_error ?? "" }, s.last_error ?? ""),
    ),
  );
  body.replaceChildren(...rows);
  $("send-more").hidden = !page.next || state.sendLimit >= 1000;
  $("send-empty").hidden = body.rows.length > 0;
}

$("send-more").addEventListener("click", () => {
  state.sendLimit = Math.min(1000, state.sendLimit + 50);
  refresh();
});

$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  state.sendsShown = null;
  state.sendLimit = 50;
  const local = (id) => ($(id).value ? new Date($(id).value).toISOString() : "");
  state.sendFilters = {
    destination: $("f-destination").value,
    state: $("f-state").value,
    run: $("f-run").value.trim(),
    since: local("f-since"),
    until: local("f-until"),
  };
  guarded(() => loadSends());
});
$("filters").addEventListener("reset", () => {
  state.sendFilters = {};
  state.sendsShown = null;
  setTimeout(() => guarded(() => loadSends()));
});

async function showDetail(id, scroll) {
  state.selected = id;
  // Answers may come back out of order: only the last asked for is shown.
  const asked = (state.detailAsked = (state.detailAsked ?? 0) + 1);
  for (const row of $("send-list").tBodies[0].rows) row.classList.toggle("selected", row.dataset.id === id);
  const panel = $("detail");
  let send;
  try {
    send = await guarded(() => api("GET", `/v1/events/${encodeURIComponent(id)}`));
  } catch (error) {
    panel.replaceChildren(el("p", { class: "error" }, error.message));
    panel.hidden = false;
    return;
  }
  if (!send || asked !== state.detailAsked || state.selected !== id) return;
  const facts = [
    ["Send", el("span", { class: "mono" }, send.id)],
    ["Destination", send.destination],
    ["Run", send.run ?? "—"],
    ["Attempts", send.attempts],
    ["Made", dateTime(send.created_at)],
    ["Changed", dateTime(send.updated_at)],
  ];
  if (send.next_attempt_at) facts.push(["Next attempt", dateTime(send.next_attempt_at)]);
  if (send.last_error) facts.push(["Last error", el("span", { class: "bad" }, send.last_error)]);
  const response = send.response;
  const attempts = send.attempts_log ?? [];
  panel.replaceChildren(
    el(
      "div",
      { class: "head" },
      el("h2", {}, "Send"),
      badge(send.state),
      send.state === "dead"
        ? el("button", { type: "button", id: "detail-replay", onclick: () => replay({ ids: [send.id] }, true) }, "Replay")
        : null,
      el("button", { type: "button", class: "quiet small", onclick: () => { state.selected = null; panel.hidden = true; } }, "Close"),
    ),
    el("dl", {}, facts.map(([name, value]) => [el("dt", {}, name), el("dd", {}, value)])),
    el("h3", {}, "Last response"),
    response
      ? el(
          "dl",
          {},
          el("dt", {}, "Status"), el("dd", {}, response.status ?? "—"),
          el("dt", {}, "Took"), el("dd", {}, `${response.elapsed_ms} ms`),
          response.location ? [el("dt", {}, "Location"), el("dd", {}, response.location)] : null,
          response.body_excerpt ? [el("dt", {}, "Body"), el("dd", {}, el("pre", {}, response.body_excerpt))] : null,
        )
      : el("p", { class: "message" }, "No answer yet."),
    el("h3", {}, `Attempts (${attempts.length})`),
    attempts.length
      ? el(
          "table",
          { id: "attempts" },
          el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "Started"), el("th", { class: "num" }, "Took"), el("th", {}, "Outcome"), el("th", {}, "Status"), el("th", {}, "Error / answer"))),
          el(
            "tbody",
            {},
            attempts.map((a) =>
              el(
                "tr",
                {},
                el("td", {}, a.number),
                el("td", { title: dateTime(a.started_at) }, time(a.started_at)),
                el("td", { class: "num" }, a.duration_ms === undefined ? "" : `${a.duration_ms} ms`),
                el("td", {}, badge(a.outcome)),
                el("td", {}, a.status_code ?? ""),
                el("td", {}, a.error ?? "", a.response_excerpt ? el("pre", {}, a.response_excerpt) : null),
              ),
            ),
          ),
        )
      : el("p", { class: "message" }, "Not attempted yet."),
    el("h3", {}, "Payload"),
    send.payload
      ? el("pre", { id: "payload" }, JSON.stringify(send.payload, null, 2))
      : el("p", { class: "message" }, "Kept only while the send waits as a dead letter."),
  );
  panel.hidden = false;
  if (scroll) panel.scrollTop = 0;
}

// ---- dead letters -------------------------------------------------------------------------

async function loadDead() {
  const page = await api("GET", "/v1/dead-letters?limit=200");
  const shown = page.dead_letters.map((letter) => letter.id).join();
  if (shown === state.deadShown) return;
  state.deadShown = shown;
  const chosen = new Set(selectedLetters());
  const body = $("dead-list").tBodies[0];
  body.replaceChildren(
    ...page.dead_letters.map((letter) =>
      el(
        "tr",
        { "data-id": letter.id },
        el("td", {}, el("input", { type: "checkbox", value: letter.id, checked: chosen.has(letter.id), onchange: updateReplayButton })),
        el("td", { class: "nowrap", title: dateTime(letter.died_at) }, time(letter.died_at)),
        el("td", { class: "mono", title: letter.id }, shortId(letter.id)),
        el("td", {}, letter.destination),
        el("td", { class: "num" }, letter.attempts),
        el("td", { class: "error-text", title: letter.reason }, letter.reason),
        el("td", {}, el("button", { type: "button", class: "small", onclick: () => replay({ ids: [letter.id] }) }, "Replay")),
      ),
    ),
  );
  $("dead-empty").hidden = page.dead_letters.length > 0;
  updateReplayButton();
}

function selectedLetters() {
  return [...$("dead-list").querySelectorAll("tbody input:checked")].map((box) => box.value);
}

function updateReplayButton() {
  const count = selectedLetters().length;
  $("replay-selected").disabled = count === 0;
  $("replay-selected").textContent = count ? `Replay selected (${count})` : "Replay selected";
}

$("dead-all").addEventListener("change", (event) => {
  for (const box of $("dead-list").querySelectorAll("tbody input")) box.checked = event.target.checked;
  updateReplayButton();
});
$("replay-selected").addEventListener("click", () => replay({ ids: selectedLetters() }));
$("replay-all").addEventListener("click", () => {
  const destination = $("replay-destination").value;
  if (destination) replay({ destination });
});

async function replay(request, fromDetail = false) {
  const answer = await guarded(() => api("POST", "/v1/dead-letters/replay", request)).catch((error) => {
    $("dead-message").textContent = error.message;
  });
  if (!answer) return;
  const count = answer.replayed.length;
  $("dead-message").textContent = `${count} queued again${answer.more ? "; more match — replay again" : ""}.`;
  $("dead-all").checked = false;
  if (fromDetail && request.ids) await showDetail(request.ids[0], false);
  state.deadShown = null;
  refresh();
}

// ---- endpoints ----------------------------------------------------------------------------

async function loadEndpoints() {
  const { endpoints } = await api("GET", "/v1/endpoints");
  const body = $("endpoint-list").tBodies[0];
  body.replaceChildren(
    ...endpoints.map((e) =>
      el(
        "tr",
        { "data-target": e.target },
        el("td", { class: "mono" }, e.target),
        el("td", {}, e.kind),
        el("td", {}, badge(e.state), e.paused_by ? ` by ${e.paused_by}` : ""),
        el("td", { class: "num" }, e.in_flight),
        el("td", { class: "num" }, rate(e.attempts_per_second)),
        el("td", { class: "num" }, rate(e.failures_per_second)),
        el("td", { class: "error-text", title: e.last_error ?? "" }, e.last_error ?? ""),
        el(
          "td",
          {},
          e.state === "open"
            ? el("button", { type: "button", class: "small quiet", onclick: () => endpoint(e.target, "pause") }, "Pause")
            : el("button", { type: "button", class: "small", onclick: () => endpoint(e.target, "resume") }, "Resume"),
        ),
      ),
    ),
  );
  $("endpoint-empty").hidden = endpoints.length > 0;
}

async function endpoint(target, action) {
  await guarded(() => api("POST", `/v1/endpoints/${encodeURIComponent(target)}/${action}`)).catch((error) => alert(error.message));
  refresh();
}

start().catch((error) => {
  document.querySelector("main").replaceChildren(el("p", { class: "error" }, `The dashboard could not start: ${error.message}`));
});
