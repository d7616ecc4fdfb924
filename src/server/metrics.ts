/**
 * Prometheus metrics in the text exposition format (version 0.0.4): counters, gauges and
 * histograms with labels. Small enough to own rather than add a dependency; the format is
 * https://prometheus.io/docs/instrumenting/exposition_formats/.
 */

type Labels = Record<string, string>;

function labelKey(labels: Labels): string {
  const names = Object.keys(labels).sort();
  return names.map((n) => `${n}="${escapeLabel(labels[n]!)}"`).join(",");
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function formatNumber(value: number): string {
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  if (Number.isNaN(value)) return "NaN";
  return String(value);
}

function withLabels(name: string, key: string): string {
  return key ? `${name}{${key}}` : name;
}

interface Metric {
  readonly name: string;
  render(): string;
}

export class Counter implements Metric {
  private readonly values = new Map<string, number>();
  constructor(
    readonly name: string,
    private readonly help: string,
  ) {}
  inc(labels: Labels = {}, by = 1): void {
    const key = labelKey(labels);
    this.values.set(key, (this.values.get(key) ?? 0) + by);
  }
  get(labels: Labels = {}): number {
    return this.values.get(labelKey(labels)) ?? 0;
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    if (this.values.size === 0) lines.push(`${this.name} 0`);
    for (const [key, value] of this.values) lines.push(`${withLabels(this.name, key)} ${formatNumber(value)}`);
    return lines.join("\n");
  }
}

/** A gauge whose value is read when metrics are rendered (or set directly). */
export class Gauge implements Metric {
  private value = 0;
  constructor(
    readonly name: string,
    private readonly help: string,
    private readonly read?: () => number,
  ) {}
  set(value: number): void {
    this.value = value;
  }
  render(): string {
    const value = this.read ? this.read() : this.value;
    return [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} gauge`, `${this.name} ${formatNumber(value)}`].join("\n");
  }
}

export class Histogram implements Metric {
  private readonly series = new Map<string, { counts: number[]; sum: number; count: number }>();
  constructor(
    readonly name: string,
    private readonly help: string,
    /** Upper bounds, increasing; +Inf is implicit. */
    private readonly buckets: readonly number[],
  ) {}
  observe(value: number, labels: Labels = {}): void {
    const key = labelKey(labels);
    let s = this.series.get(key);
    if (!s) {
      s = { counts: new Array<number>(this.buckets.length).fill(0), sum: 0, count: 0 };
      this.series.set(key, s);
    }
    for (let i = 0; i < this.buckets.length; i++) if (value <= this.buckets[i]!) s.counts[i]!++;
    s.sum += value;
    s.count++;
  }
  count(labels: Labels = {}): number {
    return this.series.get(labelKey(labels))?.count ?? 0;
  }
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    const series = this.series.size ? this.series : new Map([["", { counts: this.buckets.map(() => 0), sum: 0, count: 0 }]]);
    for (const [key, s] of series) {
      const prefix = key ? `${key},` : "";
      this.buckets.forEach((bound, i) => lines.push(`${this.name}_bucket{${prefix}le="${formatNumber(bound)}"} ${s.counts[i]}`));
      lines.push(`${this.name}_bucket{${prefix}le="+Inf"} ${s.count}`);
      lines.push(`${withLabels(`${this.name}_sum`, key)} ${formatNumber(s.sum)}`);
      lines.push(`${withLabels(`${this.name}_count`, key)} ${s.count}`);
    }
    return lines.join("\n");
  }
}

/** Powers of two times `start`: start, 2*start, ... (count bounds). */
export function exponentialBuckets(start: number, factor: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => Number((start * factor ** i).toPrecision(6)));
}

export class MetricsRegistry {
  private readonly metrics: Metric[] = [];
  add<M extends Metric>(metric: M): M {
    this.metrics.push(metric);
    return metric;
  }
  render(): string {
    return this.metrics.map((m) => m.render()).join("\n") + "\n";
  }
}

/** The metrics a Blossom server exports. Engine figures are sampled when /metrics is scraped. */
export class ServerMetrics {
  readonly registry = new MetricsRegistry();
  readonly requests: Counter;
  readonly requestDuration: Histogram;
  readonly generatedTokens: Counter;
  readonly promptTokens: Counter;
  readonly timeToFirstToken: Histogram;
  readonly timePerToken: Histogram;
  readonly finished: Counter;
  readonly overloaded: Counter;
  readonly inFlight: Gauge;
  readonly queueSize: Gauge;
  readonly batchSize: Gauge;
  readonly kvBlocksFree: Gauge;
  readonly kvBlocksTotal: Gauge;
  readonly residentMemory: Gauge;
  readonly heapUsed: Gauge;
  readonly connectionsOpen: Gauge;
  readonly connectionsDropped: Counter;

  /** `readInFlight`: sequences accepted and not finished; `readOpenConnections`: client connections open now. */
  constructor(readInFlight: () => number, readOpenConnections: () => number = () => 0) {
    const r = this.registry;
    this.requests = r.add(new Counter("blossom_request_count", "HTTP requests answered, by route and status code"));
    this.requestDuration = r.add(
      new Histogram("blossom_request_duration_seconds", "Time from receiving a request to its last byte, by route", exponentialBuckets(0.001, 2, 16)),
    );
    this.generatedTokens = r.add(new Counter("blossom_generated_tokens_total", "Tokens generated for clients"));
    this.promptTokens = r.add(new Counter("blossom_prompt_tokens_total", "Prompt tokens of admitted generation requests"));
    this.timeToFirstToken = r.add(
      new Histogram("blossom_time_to_first_token_seconds", "Time from admission by the server to a sequence's first token", exponentialBuckets(0.001, 2, 16)),
    );
    this.timePerToken = r.add(
      new Histogram("blossom_time_per_output_token_seconds", "Time between consecutive tokens of a sequence", exponentialBuckets(0.0005, 2, 14)),
    );
    this.finished = r.add(new Counter("blossom_sequences_finished_total", "Generated sequences, by finish reason (length, eos_token, stop_sequence, cancelled: by the client or at shutdown, error: the engine failed it)"));
    this.overloaded = r.add(new Counter("blossom_requests_rejected_overloaded_total", "Generation requests refused with 429 at the concurrency limit"));
    this.connectionsOpen = r.add(new Gauge("blossom_connections_open", "Client connections open now", readOpenConnections));
    this.connectionsDropped = r.add(new Counter("blossom_connections_dropped_total", "Client connections closed as they were accepted, at --max-connections"));
    this.inFlight = r.add(new Gauge("blossom_sequences_in_flight", "Sequences accepted by the server and not finished (queued or running)", readInFlight));
    this.queueSize = r.add(new Gauge("blossom_queue_size", "Sequences waiting in the engine for admission to the batch"));
    this.batchSize = r.add(new Gauge("blossom_batch_current_size", "Sequences in the running batch"));
    this.kvBlocksFree = r.add(new Gauge("blossom_kv_cache_blocks_free", "Free KV-cache blocks"));
    this.kvBlocksTotal = r.add(new Gauge("blossom_kv_cache_blocks_total", "KV-cache blocks in the pool"));
    // The process as a whole (the engine worker and the mapped weights count in its resident set):
    // prom-client's standard names, read at each scrape.
    this.residentMemory = r.add(new Gauge("process_resident_memory_bytes", "Resident memory size in bytes", () => process.memoryUsage.rss()));
    this.heapUsed = r.add(new Gauge("nodejs_heap_size_used_bytes", "The main thread's V8 heap in use, in bytes", () => process.memoryUsage().heapUsed));
  }
}
