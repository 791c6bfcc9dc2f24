/**
 * A thin, typed client for the destinations server: runs and sends in, statuses, attempt logs
 * and dead letters out. Uses the platform's `fetch` (Node 18+, browsers, Deno, Bun). Every
 * refusal throws a {@link DestinationsError} with the server's `code`, `message` and, when a
 * field is at fault, its path (`sends[1].payload.url`).
 */
/** The server refused a request (or could not be reached: `status` 0, `code` `unreachable`). */
export class DestinationsError extends Error {
    status;
    code;
    field;
    constructor(status, code, message, field) {
        super(`${status} ${code}: ${message}`);
        this.status = status;
        this.code = code;
        this.field = field;
        this.name = "DestinationsError";
    }
}
/** The API of one server. */
export class Client {
    baseUrl;
    #token;
    #timeoutMs;
    #fetch;
    constructor(baseUrl = "http://127.0.0.1:8080", options = {}) {
        this.baseUrl = baseUrl.replace(/\/+$/, "");
        this.#token = options.token;
        this.#timeoutMs = options.timeoutMs ?? 70_000;
        this.#fetch = options.fetch ?? globalThis.fetch;
    }
    /** Send a run: every send is checked, then all are queued or none. */
    run(sends, options = {}) {
        const body = { sends };
        if (options.runId !== undefined)
            body.run_id = options.runId;
        if (options.failed)
            body.failed = true;
        return this.#call("POST", "/v1/runs", { body });
    }
    /** One send outside any run; its id. */
    async send(destination, payload) {
        const accepted = await this.#call("POST", `/v1/send/${encodeURIComponent(destination)}`, { body: payload });
        return accepted.id;
    }
    /**
     * A send's status with every attempt; with `wait` (`"10s"`, at most 60 s), once it is
     * delivered or dead, or as it is when the wait ends.
     */
    status(id, options = {}) {
        return this.#call("GET", `/v1/events/${encodeURIComponent(id)}`, {
            query: { wait: options.wait },
        });
    }
    /** The sends the server remembers, newest first; pass `next` as `after` for more. */
    events(filter = {}) {
        return this.#call("GET", "/v1/events", { query: { ...filter } });
    }
    async destinations() {
        const list = await this.#call("GET", "/v1/destinations");
        return list.destinations;
    }
    deadLetters(filter = {}) {
        return this.#call("GET", "/v1/dead-letters", { query: { ...filter } });
    }
    /** Queue dead letters again (all of them when nothing selects). */
    replay(request = {}) {
        return this.#call("POST", "/v1/dead-letters/replay", { body: request });
    }
    async endpoints() {
        const list = await this.#call("GET", "/v1/endpoints");
        return list.endpoints;
    }
    pause(target) {
        return this.#call("POST", `/v1/endpoints/${encodeURIComponent(target)}/pause`);
    }
    resume(target) {
        return this.#call("POST", `/v1/endpoints/${encodeURIComponent(target)}/resume`);
    }
    /** The token stays out of logs. */
    toJSON() {
        return { baseUrl: this.baseUrl };
    }
    async #call(method, path, options = {}) {
        const url = new URL(this.baseUrl + path);
        for (const [name, value] of Object.entries(options.query ?? {})) {
            if (value !== undefined)
                url.searchParams.set(name, String(value));
        }
        const headers = { accept: "application/json" };
        if (method === "POST")
            headers["content-type"] = "application/json";
        if (this.#token)
            headers.authorization = `Bearer ${this.#token}`;
        let response;
        try {
            response = await this.#fetch(url, {
                method,
                headers,
                body: options.body === undefined ? (method === "POST" ? "{}" : undefined) : JSON.stringify(options.body),
                signal: AbortSignal.timeout(this.#timeoutMs),
            });
        }
        catch (cause) {
            throw new DestinationsError(0, "unreachable", `${this.baseUrl} could not be reached: ${String(cause)}`);
        }
        const text = await response.text();
        if (!response.ok)
            throw refusal(response.status, text);
        return (text ? JSON.parse(text) : null);
    }
}
function refusal(status, text) {
    try {
        const { error } = JSON.parse(text);
        return new DestinationsError(status, error.code, error.message, error.field);
    }
    catch {
        return new DestinationsError(status, "unexpected", text.slice(0, 200) || "no body");
    }
}
