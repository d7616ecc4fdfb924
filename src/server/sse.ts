/**
 * Server-sent events over a hijacked fastify reply, and cancellation when the client goes away.
 */
import type { FastifyReply } from "fastify";
import { CancelReason } from "./service.js";

export class SseStream {
  private readonly keepAlive: NodeJS.Timeout;
  private ended = false;

  /**
   * `dataPrefix` is "data:" for text-generation-inference (axum writes no space) and "data: " for
   * OpenAI; SSE readers accept both.
   */
  constructor(
    private readonly reply: FastifyReply,
    private readonly dataPrefix: "data:" | "data: ",
    headers: Record<string, string> = {},
  ) {
    reply.hijack();
    reply.raw.writeHead(200, {
      "content-type": "text/event-stream",
      "cache-control": "no-cache",
      connection: "keep-alive",
      // Proxies such as nginx would otherwise buffer the stream.
      "x-accel-buffering": "no",
      ...headers,
    });
    reply.raw.flushHeaders();
    // A comment line every 15 s keeps idle proxies from closing a stream that waits in the queue.
    this.keepAlive = setInterval(() => this.write(":\n\n"), 15_000);
    this.keepAlive.unref();
    reply.raw.once("close", () => clearInterval(this.keepAlive));
  }

  get closed(): boolean {
    return this.ended || this.reply.raw.destroyed || this.reply.raw.writableEnded;
  }

  send(data: unknown): void {
    this.write(`${this.dataPrefix}${typeof data === "string" ? data : JSON.stringify(data)}\n\n`);
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.keepAlive);
    if (!this.reply.raw.writableEnded) this.reply.raw.end();
  }

  private write(text: string): void {
    if (this.closed) return;
    this.reply.raw.write(text);
  }
}

/**
 * Aborts `controller` when the client disconnects before the response is complete, which cancels
 * its sequences and frees their KV-cache blocks at the engine's next step.
 */
export function cancelOnDisconnect(reply: FastifyReply, controller: AbortController): void {
  const cancel = () => {
    if (!reply.raw.writableFinished) controller.abort(new CancelReason("client"));
  };
  // The routes call this after tokenizing the prompt: a client gone by then has already fired
  // "close", and waiting for it would leave its sequence generating for nobody.
  if (reply.raw.destroyed || reply.request.raw.socket?.destroyed === true) cancel();
  else reply.raw.once("close", cancel);
}
