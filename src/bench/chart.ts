/**
 * An SVG chart of ms/token against batch size, both axes logarithmic, one line per configuration,
 * OOM marked where a line stops. Written by hand: the charting libraries that render SVG in Node
 * (vega-lite) need Node 22, and this is a hundred lines.
 */
import type { ConfigResult } from "./types.js";

const palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function escape(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/** Powers of ten (and 2x, 5x) spanning [min, max]. */
function logTicks(min: number, max: number): number[] {
  const ticks: number[] = [];
  for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) {
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** e;
      if (v >= min * 0.999 && v <= max * 1.001) ticks.push(v);
    }
  }
  return ticks;
}

export function renderChart(results: ConfigResult[], batchSizes: number[], title: string): string {
  const width = 760, height = 460;
  const margin = { left: 70, right: 200, top: 50, bottom: 55 };
  const plotW = width - margin.left - margin.right, plotH = height - margin.top - margin.bottom;
  const values = results.flatMap((r) => r.cells.flatMap((c) => (c.status === "ok" ? [c.msPerToken] : [])));
  const yMin = values.length ? Math.min(...values) / 1.5 : 0.1;
  const yMax = values.length ? Math.max(...values) * 1.5 : 100;
  const xMin = Math.min(...batchSizes), xMax = Math.max(...batchSizes);
  const x = (bs: number) => margin.left + (xMax === xMin ? plotW / 2 : ((Math.log(bs) - Math.log(xMin)) / (Math.log(xMax) - Math.log(xMin))) * plotW);
  const y = (ms: number) => margin.top + plotH - ((Math.log(ms) - Math.log(yMin)) / (Math.log(yMax) - Math.log(yMin))) * plotH;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  out.push(`<text x="${margin.left}" y="28" font-size="16" font-weight="bold">${escape(title)}</text>`);
  // Grid and axes.
  for (const t of logTicks(yMin, yMax)) {
    out.push(`<line x1="${margin.left}" x2="${margin.left + plotW}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}" stroke="#e5e5e5"/>`);
    out.push(`<text x="${margin.left - 8}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end" fill="#444">${t < 1 ? t.toPrecision(1) : t}</text>`);
  }
  for (const bs of batchSizes) {
    out.push(`<line x1="${x(bs).toFixed(1)}" x2="${x(bs).toFixed(1)}" y1="${margin.top}" y2="${margin.top + plotH}" stroke="#f0f0f0"/>`);
    out.push(`<text x="${x(bs).toFixed(1)}" y="${margin.top + plotH + 18}" text-anchor="middle" fill="#444">${bs}</text>`);
  }
  out.push(`<rect x="${margin.left}" y="${margin.top}" width="${plotW}" height="${plotH}" fill="none" stroke="#888"/>`);
  out.push(`<text x="${margin.left + plotW / 2}" y="${height - 14}" text-anchor="middle">batch size (log)</text>`);
  out.push(`<text transform="translate(18 ${margin.top + plotH / 2}) rotate(-90)" text-anchor="middle">ms per token (log; lower is better)</text>`);
  // One line per configuration.
  results.forEach((r, i) => {
    const color = palette[i % palette.length]!;
    const points = r.cells.flatMap((c) => (c.status === "ok" ? [[x(c.batchSize), y(c.msPerToken)] as const] : []));
    if (points.length > 1) out.push(`<polyline fill="none" stroke="${color}" stroke-width="2.5" points="${points.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" ")}"/>`);
    for (const [a, b] of points) out.push(`<circle cx="${a.toFixed(1)}" cy="${b.toFixed(1)}" r="4" fill="${color}"/>`);
    for (const c of r.cells.filter((c) => c.status === "oom")) {
      const cx = x(c.batchSize), cy = margin.top + plotH - 12 - 14 * i;
      out.push(`<text x="${cx.toFixed(1)}" y="${cy.toFixed(1)}" text-anchor="middle" fill="${color}" font-weight="bold">OOM</text>`);
    }
    const ly = margin.top + 10 + 22 * i;
    out.push(`<line x1="${margin.left + plotW + 16}" x2="${margin.left + plotW + 40}" y1="${ly}" y2="${ly}" stroke="${color}" stroke-width="2.5"/>`);
    out.push(`<text x="${margin.left + plotW + 46}" y="${ly + 4}">${escape(r.config.label)}</text>`);
  });
  out.push(`</svg>`);
  return out.join("\n") + "\n";
}
