/** Small HTTP helpers for the server tests: JSON requests, server-sent events, bounded polling. */

export interface JsonResponse<T = any> {
  status: number;
  headers: Headers;
  body: T;
}

/** POSTs `body` (an object as JSON, or a raw string) and parses the answer as JSON when it is JSON. */
export async function post<T = any>(url: string, body: unknown, headers: Record<string, string> = {}): Promise<JsonResponse<T>> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: response.status, headers: response.headers, body: await parse(response) };
}

export async function get<T = any>(url: string): Promise<JsonResponse<T>> {
  const response = await fetch(url);
  return { status: response.status, headers: response.headers, body: await parse(response) };
}

async function parse(response: Response): Promise<any> {
  const text = await response.text();
  const type = response.headers.get("content-type") ?? "";
  return type.includes("json") ? JSON.parse(text) : text;
}

export interface SseResult {
  status: number;
  /** Parsed `data:` payloads in order ("[DONE]" stays a string). */
  events: any[];
  /** The JSON body of a non-stream answer (an error before the stream started). */
  body?: any;
}

/**
 * POSTs and reads the server-sent events. `onEvent` sees each event as it arrives; returning
 * "stop" aborts the request (the client disconnects).
 */
export async function postStream(url: string, body: unknown, onEvent?: (event: any, index: number) => void | "stop"): Promise<SseResult> {
  const controller = new AbortController();
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal: controller.signal,
  });
  if (!(response.headers.get("content-type") ?? "").includes("text/event-stream")) {
    return { status: response.status, events: [], body: await parse(response) };
  }
  const events: any[] = [];
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          const event = payload === "[DONE]" ? payload : JSON.parse(payload);
          events.push(event);
          if (onEvent?.(event, events.length - 1) === "stop") {
            controller.abort();
            return { status: response.status, events };
          }
        }
      }
    }
  } catch (err) {
    if ((err as Error).name !== "AbortError") throw err;
  }
  return { status: response.status, events };
}

/** Calls `check` until it returns a truthy value, at most `attempts` times, `intervalMs` apart. */
export async function pollUntil<T>(check: () => Promise<T | undefined | false>, what: string, attempts = 200, intervalMs = 25): Promise<T> {
  let last: unknown;
  for (let i = 0; i < attempts; i++) {
    const value = await check();
    if (value) return value;
    last = value;
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/** The value of an unlabelled metric (or the first series matching `labels`) in Prometheus text. */
export function metric(text: string, name: string, labels = ""): number | undefined {
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const [key, value] = line.split(" ");
    if (key === name || (key!.startsWith(`${name}{`) && key!.includes(labels))) return Number(value);
  }
  return undefined;
}
