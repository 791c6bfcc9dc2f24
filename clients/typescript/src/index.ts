/**
 * A thin, typed client for the destinations server: runs and sends in, statuses, attempt logs
 * and dead letters out. Uses the platform's `fetch` (Node 18+, browsers, Deno, Bun). Every
 * refusal throws a {@link DestinationsError} with the server's `code`, `message` and, when a
 * field is at fault, its path (`sends[1].payload.url`).
 */

/** Where a send is. */
export type State = "queued" | "in_flight" | "delivered" | "retrying" | "dead";

/** One send of a run: the destination instance, and what its kind takes. */
export interface Send {
  destination: string;
  payload: Record<string, unknown>;
}

export interface RunAccepted {
  run_id: string;
  ids: string[];
}

/** The target's answer to an attempt. */
export interface ResponseSummary {
  status?: number;
  elapsed_ms: number;
  body_excerpt?: string;
  location?: string;
}

/** One delivery attempt. */
export interface Attempt {
  number: number;
  started_at: string;
  duration_ms?: number;
  outcome: "delivered" | "retry" | "failed";
  status_code?: number;
  response_excerpt?: string;
  error?: string;
}

/** Everything known about one send. */
export interface SendStatus {
  id: string;
  destination: string;
  run?: string;
  state: State;
  attempts: number;
  last_error: string | null;
  response?: ResponseSummary;
  created_at: string;
  updated_at: string;
  next_attempt_at?: string;
  /** Every attempt, oldest first: given by {@link Client.status}, not in listings. */
  attempts_log?: Attempt[];
}

export interface EventPage {
  events: SendStatus[];
  /** Pass as `after` for the next page; `null` on the last. */
  next: string | null;
}

export interface EventFilter {
  destination?: string;
  state?: State;
  run?: string;
  /** RFC 3339: sends made at or after. */
  since?: string;
  /** RFC 3339: sends made before. */
  until?: string;
  limit?: number;
  after?: string;
}

export interface DeadLetter {
  id: string;
  destination: string;
  run?: string;
  attempts: number;
  reason: string;
  created_at: string;
  died_at: string;
  payload: Record<string, unknown>;
}

export interface DeadLetterPage {
  dead_letters: DeadLetter[];
  next: string | null;
  evicted: number;
}

export interface DeadLetterFilter {
  destination?: string;
  since?: string;
  until?: string;
  limit?: number;
  after?: string;
}

export interface ReplayRequest {
  ids?: string[];
  destination?: string;
  since?: string;
  until?: string;
  limit?: number;
}

export interface Replayed {
  replayed: string[];
  more: boolean;
}

/** The server refused a request (or could not be reached: `status` 0, `code` `unreachable`). */
export class DestinationsError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly field?: string,
  ) {
    super(`${status} ${code}: ${message}`);
    this.name = "DestinationsError";
  }
}

export interface ClientOptions {
  /** The server's `api_token`, when it has one. */
  token?: string;
  /** Abort a call after this many milliseconds (default 70 000: a status `wait` is ≤ 60 s). */
  timeoutMs?: number;
  /** A `fetch` of your own (default: the global one). */
  fetch?: typeof fetch;
}

type Query = Record<string, string | number | undefined>;

/** The API of one server. */
export class Client {
  readonly baseUrl: string;
  readonly #token?: string;
  readonly #timeoutMs: number;
  readonly #fetch: typeof fetch;

  constructor(baseUrl = "http://127.0.0.1:8080", options: ClientOptions = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.#token = options.token;
    this.#timeoutMs = options.timeoutMs ?? 70_000;
    this.#fetch = options.fetch ?? globalThis.fetch;
  }

  /** Send a run: every send is checked, then all are queued or none. */
  run(sends: Send[], options: { runId?: string; failed?: boolean } = {}): Promise<RunAccepted> {
    const body: Record<string, unknown> = { sends };
    if (options.runId !== undefined) body.run_id = options.runId;
    if (options.failed) body.failed = true;
    return this.#call("POST", "/v1/runs", { body });
  }

  /** One send outside any run; its id. */
  async send(destination: string, payload: Record<string, unknown>): Promise<string> {
    const accepted = await this.#call<{ id: string }>(
      "POST",
      `/v1/send/${encodeURIComponent(destination)}`,
      { body: payload },
    );
    return accepted.id;
  }

  /**
   * A send's status with every attempt; with `wait` (`"10s"`, at most 60 s), once it is
   * delivered or dead, or as it is when the wait ends.
   */
  status(id: string, options: { wait?: string } = {}): Promise<SendStatus> {
    return this.#call("GET", `/v1/events/${encodeURIComponent(id)}`, {
      query: { wait: options.wait },
    });
  }

  /** The sends the server remembers, newest first; pass `next` as `after` for more. */
  events(filter: EventFilter = {}): Promise<EventPage> {
    return this.#call("GET", "/v1/events", { query: { ...filter } });
  }

  async destinations(): Promise<{ name: string; kind: string }[]> {
    const list = await this.#call<{ destinations: { name: string; kind: string }[] }>(
      "GET",
      "/v1/destinations",
    );
    return list.destinations;
  }

  deadLetters(filter: DeadLetterFilter = {}): Promise<DeadLetterPage> {
    return this.#call("GET", "/v1/dead-letters", { query: { ...filter } });
  }

  /** Queue dead letters again (all of them when nothing selects). */
  replay(request: ReplayRequest = {}): Promise<Replayed> {
    return this.#call("POST", "/v1/dead-letters/replay", { body: request });
  }

  async endpoints(): Promise<Record<string, unknown>[]> {
    const list = await this.#call<{ endpoints: Record<string, unknown>[] }>(
      "GET",
      "/v1/endpoints",
    );
    return list.endpoints;
  }

  pause(target: string): Promise<Record<string, unknown>> {
    return this.#call("POST", `/v1/endpoints/${encodeURIComponent(target)}/pause`);
  }

  resume(target: string): Promise<Record<string, unknown>> {
    return this.#call("POST", `/v1/endpoints/${encodeURIComponent(target)}/resume`);
  }

  /** The token stays out of logs. */
  toJSON(): { baseUrl: string } {
    return { baseUrl: this.baseUrl };
  }

  async #call<T>(
    method: string,
    path: string,
    options: { body?: unknown; query?: Query } = {},
  ): Promise<T> {
    const url = new URL(this.baseUrl + path);
    for (const [name, value] of Object.entries(options.query ?? {})) {
      if (value !== undefined) url.searchParams.set(name, String(value));
    }
    const headers: Record<string, string> = { accept: "application/json" };
    if (method === "POST") headers["content-type"] = "application/json";
    if (this.#token) headers.authorization = `Bearer ${this.#token}`;
    let response: Response;
    try {
      response = await this.#fetch(url, {
        method,
        headers,
        body: options.body === undefined ? (method === "POST" ? "{}" : undefined) : JSON.stringify(options.body),
        signal: AbortSignal.timeout(this.#timeoutMs),
      });
    } catch (cause) {
      throw new DestinationsError(0, "unreachable", `${this.baseUrl} could not be reached: ${String(cause)}`);
    }
    const text = await response.text();
    if (!response.ok) throw refusal(response.status, text);
    return (text ? JSON.parse(text) : null) as T;
  }
}

function refusal(status: number, text: string): DestinationsError {
  try {
    const { error } = JSON.parse(text) as {
      error: { code: string; message: string; field?: string };
    };
    return new DestinationsError(status, error.code, error.message, error.field);
  } catch {
    return new DestinationsError(status, "unexpected", text.slice(0, 200) || "no body");
  }
}
