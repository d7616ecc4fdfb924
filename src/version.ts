import { readFileSync } from "node:fs";

let cached: string | undefined;

/** The version in package.json (dist/src/version.js sits two folders below the package root). */
export function packageVersion(): string {
  if (cached === undefined) {
    const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string };
    cached = pkg.version;
  }
  return cached;
}
