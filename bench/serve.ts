/**
 * `npm run bench:serve`: load on the HTTP server. Starts a server on a model (default: the
 * trained-bloom-small fixture), sends the same requests once one at a time and once from N
 * concurrent clients, and prints throughput (generated tokens/s, requests/s), latency percentiles
 * (time to first token and total, p50/p90/p99) and the speedup continuous batching gives.
 *
 *   npm run bench:serve -- [--model DIR] [--clients 16] [--requests 4] [--max-new-tokens 64] [--json]
 *
 * Every request is greedy with min_new_tokens = max_new_tokens, so both runs generate exactly the
 * same tokens and the comparison is fair. Clients stream (/generate_stream) to measure the first
 * token; they run in this process, whose main thread the server shares (the engine has its own).
 */
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { startServer } from "../src/server/server.js";
import { benchArgs } from "./stats.js";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const defaultModel = resolve(process.env.BLOSSOM_FIXTURES ?? resolve(repoRoot, "../shared/fixtures"), "trained-bloom-small");

const prompts = [
  "In the beginning",
  "And the LORD said unto Moses,",
  "And it came to pass, when the king",
  "Blessed are the",
  "The earth is the LORD's,",
  "And he said unto them,",
  "Now these are the generations of",
  "Praise ye the LORD.",
];

interface Sample {
  ttftMs: number;
  totalMs: number;
  tokens: number;
}

interface RunSummary {
  mode: string;
  requests: number;
  wallSeconds: number;
  requestsPerSecond: number;
  tokensPerSecond: number;
  ttftMs: { p50: number; p90: number; p99: number };
  latencyMs: { p50: number; p90: number; p99: number };
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  // Nearest rank: the smallest value with at least p% of the samples at or below it.
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

/** One streamed request; resolves with its time to first token, total time and token count. */
async function streamOnce(url: string, inputs: string, maxNewTokens: number): Promise<Sample> {
  const started = performance.now();
  const response = await fetch(`${url}/generate_stream`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ inputs, parameters: { max_new_tokens: maxNewTokens, min_new_tokens: maxNewTokens } }),
  });
  if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let ttftMs = -1;
  let tokens = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data:")) continue;
      const event = JSON.parse(line.slice(5)) as { token?: unknown; error?: string };
      if (event.error) throw new Error(event.error);
      if (ttftMs < 0) ttftMs = performance.now() - started;
      tokens++;
    }
  }
  return { ttftMs, totalMs: performance.now() - started, tokens };
}

function summarize(mode: string, samples: Sample[], wallMs: number): RunSummary {
  const tokens = samples.reduce((a, s) => a + s.tokens, 0);
  const ttft = samples.map((s) => s.ttftMs);
  const total = samples.map((s) => s.totalMs);
  return {
    mode,
    requests: samples.length,
    wallSeconds: wallMs / 1000,
    requestsPerSecond: samples.length / (wallMs / 1000),
    tokensPerSecond: tokens / (wallMs / 1000),
    ttftMs: { p50: percentile(ttft, 50), p90: percentile(ttft, 90), p99: percentile(ttft, 99) },
    latencyMs: { p50: percentile(total, 50), p90: percentile(total, 90), p99: percentile(total, 99) },
  };
}

async function main(): Promise<void> {
  const { values } = benchArgs("npm run bench:serve --", "serve", {
    options: {
      model: { type: "string", default: defaultModel },
      clients: { type: "string", default: "16" },
      requests: { type: "string", default: "4" },
      "max-new-tokens": { type: "string", default: "64" },
      threads: { type: "string" },
      json: { type: "boolean", default: false },
    },
  });
  const clients = Number(values.clients);
  const perClient = Number(values.requests);
  const maxNewTokens = Number(values["max-new-tokens"]);
  for (const [name, n] of [["--clients", clients], ["--requests", perClient], ["--max-new-tokens", maxNewTokens]] as const) {
    if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be an integer >= 1`);
  }
  if (!existsSync(values.model!)) throw new Error(`--model ${values.model}: no such folder`);

  const server = await startServer({
    model: values.model!,
    port: 0,
    maxConcurrentRequests: Math.max(128, clients),
    maxBatchSize: Math.max(64, clients),
    ...(values.threads ? { threads: Number(values.threads) } : {}),
  });
  const model = await server.ready;
  const url = server.url;
  const work = Array.from({ length: clients * perClient }, (_, i) => prompts[i % prompts.length]!);
  try {
    await streamOnce(url, prompts[0]!, 8); // warm-up: first-call costs out of the way

    let started = performance.now();
    const sequential: Sample[] = [];
    for (const inputs of work) sequential.push(await streamOnce(url, inputs, maxNewTokens));
    const sequentialSummary = summarize("sequential (1 client)", sequential, performance.now() - started);

    started = performance.now();
    const concurrent = (
      await Promise.all(
        Array.from({ length: clients }, async (_, c) => {
          const mine: Sample[] = [];
          for (let k = 0; k < perClient; k++) mine.push(await streamOnce(url, work[c * perClient + k]!, maxNewTokens));
          return mine;
        }),
      )
    ).flat();
    const concurrentSummary = summarize(`concurrent (${clients} clients)`, concurrent, performance.now() - started);
    const speedup = concurrentSummary.tokensPerSecond / sequentialSummary.tokensPerSecond;

    if (values.json) {
      process.stdout.write(
        JSON.stringify({ model: model.dir, threads: model.info.threads, kernels: model.info.kernels, clients, requestsPerClient: perClient, maxNewTokens, runs: [sequentialSummary, concurrentSummary], speedup }, null, 2) + "\n",
      );
      return;
    }
    const f = (n: number, digits = 1) => n.toFixed(digits).padStart(9);
    const lines = [
      `bench:serve  model ${model.dir} (${model.info.dtype}, ${model.info.threads} threads, ${model.info.kernels})`,
      `             ${clients * perClient} requests (${clients} clients x ${perClient}), greedy, ${maxNewTokens} new tokens each, streamed over HTTP`,
      "",
      `${"mode".padEnd(26)}${"wall s".padStart(9)}${"req/s".padStart(9)}${"tok/s".padStart(9)}  ${"TTFT ms p50/p90/p99".padStart(27)}  ${"latency ms p50/p90/p99".padStart(30)}`,
    ];
    for (const s of [sequentialSummary, concurrentSummary]) {
      lines.push(
        `${s.mode.padEnd(26)}${f(s.wallSeconds, 2)}${f(s.requestsPerSecond, 2)}${f(s.tokensPerSecond)}  ${f(s.ttftMs.p50)}${f(s.ttftMs.p90)}${f(s.ttftMs.p99)}  ${f(s.latencyMs.p50)}${f(s.latencyMs.p90)}${f(s.latencyMs.p99)}`,
      );
    }
    lines.push("", `speedup from continuous batching: ${speedup.toFixed(2)}x tokens/s`);
    process.stdout.write(lines.join("\n") + "\n");
  } finally {
    await server.close();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:serve: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
