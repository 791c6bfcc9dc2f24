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
export declare class DestinationsError extends Error {
    readonly status: number;
    readonly code: string;
    readonly field?: string | undefined;
    constructor(status: number, code: string, message: string, field?: string | undefined);
}
export interface ClientOptions {
    /** The server's `api_token`, when it has one. */
    token?: string;
    /** Abort a call after this many milliseconds (default 70 000: a status `wait` is ≤ 60 s). */
    timeoutMs?: number;
    /** A `fetch` of your own (default: the global one). */
    fetch?: typeof fetch;
}
/** The API of one server. */
export declare class Client {
    #private;
    readonly baseUrl: string;
    constructor(baseUrl?: string, options?: ClientOptions);
    /** Send a run: every send is checked, then all are queued or none. */
    run(sends: Send[], options?: {
        runId?: string;
        failed?: boolean;
    }): Promise<RunAccepted>;
    /** One send outside any run; its id. */
    send(destination: string, payload: Record<string, unknown>): Promise<string>;
    /**
     * A send's status with every attempt; with `wait` (`"10s"`, at most 60 s), once it is
     * delivered or dead, or as it is when the wait ends.
     */
    status(id: string, options?: {
        wait?: string;
    }): Promise<SendStatus>;
    /** The sends the server remembers, newest first; pass `next` as `after` for more. */
    events(filter?: EventFilter): Promise<EventPage>;
    destinations(): Promise<{
        name: string;
        kind: string;
    }[]>;
    deadLetters(filter?: DeadLetterFilter): Promise<DeadLetterPage>;
    /** Queue dead letters again (all of them when nothing selects). */
    replay(request?: ReplayRequest): Promise<Replayed>;
    endpoints(): Promise<Record<string, unknown>[]>;
    pause(target: string): Promise<Record<string, unknown>>;
    resume(target: string): Promise<Record<string, unknown>>;
    /** The token stays out of logs. */
    toJSON(): {
        baseUrl: string;
    };
}
