#!/usr/bin/env node
// Runs every compiled test file (dist/test/**/*.test.js) with Node's built-in runner, after making
// sure the system packages some suites need are there (scripts/ensure-system-deps.sh) and that the
// addon was built with MPI if Open MPI has just been installed.
// Usage: node scripts/run-tests.mjs [name-filter ...]
import { spawnSync } from "node:child_process";
import { readdirSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

function find(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...find(p));
    else if (name.endsWith(".test.js")) out.push(p);
  }
  return out;
}

const filters = process.argv.slice(2);
if (process.env.BLOSSOM_SKIP_SYSTEM_DEPS !== "1") {
  spawnSync("bash", ["scripts/ensure-system-deps.sh"], { stdio: "inherit" });
  const hasMpicxx = spawnSync("sh", ["-c", "command -v mpicxx"], { stdio: "ignore" }).status === 0;
  const addon = createRequire(import.meta.url)("../build/Release/blossom_native.node");
  if (hasMpicxx && !addon.mpiAvailable()) {
    console.error("run-tests: Open MPI is installed but the addon was built without it; rebuilding");
    const r = spawnSync("npm", ["run", "build:native"], { stdio: ["ignore", "ignore", "inherit"] });
    if (r.status !== 0) process.exit(r.status ?? 1);
  }
}

const files = find("dist/test")
  .filter((f) => filters.length === 0 || filters.some((x) => f.includes(x)))
  .sort();
if (files.length === 0) {
  console.error("no test files matched");
  process.exit(1);
}
const r = spawnSync(process.execPath, ["--test", "--test-concurrency=1", "--test-reporter=spec", ...files], { stdio: "inherit" });
process.exit(r.status ?? 1);
