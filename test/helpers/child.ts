/** A child process whose output the tests wait on, with bounded waits instead of sleeps. */
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { fileURLToPath } from "node:url";

/** node dist/test/helpers/server-cli.js ARGS: `blossom serve` / `blossom chat` as a real process. */
export const serverCli = fileURLToPath(new URL("./server-cli.js", import.meta.url));

export class Child {
  readonly process: ChildProcessWithoutNullStreams;
  stdout = "";
  stderr = "";
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly listeners = new Set<() => void>();

  constructor(args: string[]) {
    this.process = spawn(process.execPath, args, { stdio: ["pipe", "pipe", "pipe"] });
    this.process.stdout.setEncoding("utf8").on("data", (d: string) => {
      this.stdout += d;
      this.notify();
    });
    this.process.stderr.setEncoding("utf8").on("data", (d: string) => {
      this.stderr += d;
      this.notify();
    });
    this.exited = new Promise((resolve) => this.process.once("exit", (code, signal) => (this.notify(), resolve({ code, signal }))));
  }

  private notify(): void {
    for (const l of this.listeners) l();
  }

  /** Resolves with the match once `pattern` appears in the stream (from `from` on); fails after `timeoutMs`. */
  waitFor(stream: "stdout" | "stderr", pattern: RegExp, from = 0, timeoutMs = 60_000): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const match = this[stream].slice(from).match(pattern);
        if (match) {
          done();
          resolve(match);
        } else if (this.process.exitCode !== null || this.process.signalCode !== null) {
          done();
          reject(new Error(`process exited before ${stream} matched ${pattern}\nstdout: ${this.stdout}\nstderr: ${this.stderr}`));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timed out waiting for ${pattern} on ${stream}\nstdout: ${this.stdout}\nstderr: ${this.stderr}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      this.listeners.add(check);
      check();
    });
  }

  /** The exit, or a failure (and SIGKILL) if the process is still running after `timeoutMs`. */
  async waitExit(timeoutMs = 60_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.process.kill("SIGKILL");
        reject(new Error(`the process did not exit within ${timeoutMs} ms\nstdout: ${this.stdout}\nstderr: ${this.stderr}`));
      }, timeoutMs);
    });
    try {
      return await Promise.race([this.exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  write(text: string): void {
    this.process.stdin.write(text);
  }

  kill(signal: NodeJS.Signals): void {
    this.process.kill(signal);
  }
}
