/** The guide's table: one row per configuration, one column per batch size, ms/token or "oom". */
import type { ConfigResult } from "./types.js";

export function formatTable(results: ConfigResult[], batchSizes: number[]): string {
  const header = ["project \\ bs", ...batchSizes.map(String)];
  const rows = results.map((r) => [
    r.config.label,
    ...batchSizes.map((bs) => {
      const cell = r.cells.find((c) => c.batchSize === bs);
      if (!cell) return r.error ? "error" : "";
      return cell.status === "ok" ? cell.msPerToken.toFixed(2) : "oom";
    }),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(" | ")} |`;
  const rule = `| ${widths.map((w, i) => (i === 0 ? ":" + "-".repeat(w - 1) : "-".repeat(w - 1) + ":")).join(" | ")} |`;
  return [line(header), rule, ...rows.map(line)].join("\n");
}
