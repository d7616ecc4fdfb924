/** What the machine offers the tests (system packages installed by scripts/ensure-system-deps.sh). */
import { execFileSync } from "node:child_process";

export function hasMpirun(): boolean {
  try {
    execFileSync("mpirun", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}
