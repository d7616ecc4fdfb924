/**
 * BLOOM's tokenizer, through Hugging Face's own `tokenizers` library (the Rust implementation,
 * npm `tokenizers`): tokenizer.json's Split(regex, Isolated) + ByteLevel pre-tokenizer and BPE
 * model are run by the same code that defines them, Oniguruma regex semantics included.
 *
 * Added here: BLOOM's left padding with attention masks, a synchronous decode (the library's is
 * async) for the streaming path, and special-token bookkeeping.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer } from "tokenizers";
import { BlossomError } from "../errors.js";
import { byteToUnicode } from "./synthetic.js";

/** GPT-2's byte-level table inverted: printable character -> the byte it stands for. */
const unicodeToByte = new Map(byteToUnicode().map((c, b) => [c, b]));

export interface BatchEncoding {
  inputIds: number[][];
  attentionMask: number[][];
}

export interface TokenizerSpecials {
  padTokenId: number | undefined;
  eosTokenId: number | undefined;
  bosTokenId: number | undefined;
}

interface AddedTokenJson {
  id: number;
  content: string;
  special?: boolean;
}

export class BloomTokenizer {
  readonly file: string;
  /** Tokens the tokenizer knows (config.json's vocab_size may be larger: BLOOM pads its embedding). */
  readonly vocabSize: number;
  readonly padTokenId: number | undefined;
  readonly eosTokenId: number | undefined;
  readonly bosTokenId: number | undefined;
  readonly specialTokenIds: ReadonlySet<number>;
  private readonly tokenizer: Tokenizer;
  private readonly decoder: { decode(tokens: string[]): string } | null;
  /** id -> token string, filled lazily (idToToken crosses into native code). */
  private readonly tokenCache = new Map<number, string | null>();
  /** Whether the decoder is byte-level (each token string is bytes written with GPT-2's table); found on first use. */
  private byteLevel: boolean | undefined;

  private constructor(file: string, tokenizer: Tokenizer, added: AddedTokenJson[], config: Record<string, unknown>) {
    this.file = file;
    this.tokenizer = tokenizer;
    this.decoder = tokenizer.getDecoder();
    this.vocabSize = tokenizer.getVocabSize(true);
    this.specialTokenIds = new Set(added.filter((t) => t.special).map((t) => t.id));
    const idOf = (key: string): number | undefined => {
      const v = config[key];
      const content = typeof v === "string" ? v : typeof v === "object" && v !== null ? (v as { content?: unknown }).content : undefined;
      return typeof content === "string" ? (tokenizer.tokenToId(content) ?? undefined) : undefined;
    };
    this.padTokenId = idOf("pad_token") ?? tokenizer.tokenToId("<pad>") ?? undefined;
    this.eosTokenId = idOf("eos_token") ?? tokenizer.tokenToId("</s>") ?? undefined;
    this.bosTokenId = idOf("bos_token") ?? tokenizer.tokenToId("<s>") ?? undefined;
  }

  /** Loads DIR/tokenizer.json (and tokenizer_config.json for the special tokens' names). */
  static fromDir(dir: string): BloomTokenizer {
    const file = join(dir, "tokenizer.json");
    if (!existsSync(file)) throw new BlossomError("tokenizer", `${file}: missing; a checkpoint folder needs tokenizer.json`);
    let tokenizer: Tokenizer;
    try {
      tokenizer = Tokenizer.fromFile(file);
    } catch (err) {
      throw new BlossomError("tokenizer", `${file}: the tokenizers library cannot load it (${(err as Error).message})`);
    }
    let config: Record<string, unknown> = {};
    const configFile = join(dir, "tokenizer_config.json");
    if (existsSync(configFile)) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(readFileSync(configFile, "utf8"));
      } catch (err) {
        throw new BlossomError("tokenizer", `${configFile}: invalid JSON (${(err as Error).message})`);
      }
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new BlossomError("tokenizer", `${configFile}: expected a JSON object`);
      config = parsed as Record<string, unknown>;
    }
    return new BloomTokenizer(file, tokenizer, readAddedTokens(file), config);
  }

  /** Token ids of `text`. BLOOM adds no BOS or EOS. */
  async encode(text: string): Promise<number[]> {
    return (await this.tokenizer.encode(text)).getIds();
  }

  /** Token ids with the [start, end) character offsets of each token in `text`. */
  async encodeWithOffsets(text: string): Promise<{ ids: number[]; offsets: [number, number][] }> {
    const e = await this.tokenizer.encode(text);
    return { ids: e.getIds(), offsets: e.getOffsets().map((o) => [o[0]!, o[1]!] as [number, number]) };
  }

  /** Encodes a batch, padded on the left to the longest with the pad token, as BLOOM expects. */
  async encodeBatch(texts: string[]): Promise<BatchEncoding> {
    const ids = await Promise.all(texts.map((t) => this.encode(t)));
    return padLeft(ids, this.padTokenId ?? 0);
  }

  /** The token string of an id (null outside the tokenizer's vocabulary). */
  idToToken(id: number): string | null {
    let t = this.tokenCache.get(id);
    if (t === undefined) {
      t = this.tokenizer.idToToken(id);
      this.tokenCache.set(id, t);
    }
    return t;
  }

  /**
   * The bytes a token stands for: a part of a multi-byte UTF-8 character stays a part. Byte-level
   * BPE (BLOOM's) token strings are mapped back through GPT-2's table; for other decoders, and for
   * added tokens written as plain text, the UTF-8 of the token's decoded text. Empty outside the vocabulary.
   */
  tokenBytes(id: number): Uint8Array {
    const token = this.idToToken(id);
    if (token === null) return new Uint8Array(0);
    // "Ġ" is the space byte in GPT-2's table: a byte-level decoder turns it into " ".
    this.byteLevel ??= this.decoder !== null && this.decoder.decode(["\u0120"]) === " ";
    if (this.byteLevel && !this.specialTokenIds.has(id)) {
      const bytes = new Uint8Array(token.length);
      let i = 0;
      for (const ch of token) {
        const b = unicodeToByte.get(ch);
        if (b === undefined) return new TextEncoder().encode(this.decode([id], { skipSpecialTokens: false }));
        bytes[i++] = b;
      }
      return bytes.subarray(0, i);
    }
    return new TextEncoder().encode(this.decode([id], { skipSpecialTokens: false }));
  }

  /**
   * Decodes ids to text, synchronously: token strings through the tokenizer's decoder (ByteLevel
   * for BLOOM), which is what the library's async decode does. Incomplete UTF-8 at the end becomes
   * U+FFFD, as in the Rust library. Ids outside the vocabulary are skipped.
   */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean } = {}): string {
    const skip = options.skipSpecialTokens ?? true;
    const tokens: string[] = [];
    for (const id of ids) {
      if (skip && this.specialTokenIds.has(id)) continue;
      const t = this.idToToken(id);
      if (t !== null) tokens.push(t);
    }
    if (tokens.length === 0) return "";
    return this.decoder ? this.decoder.decode(tokens) : tokens.join("");
  }

  /** The library's own (async) decode, for cross-checking. */
  decodeAsync(ids: number[], skipSpecialTokens = true): Promise<string> {
    return this.tokenizer.decode(ids, skipSpecialTokens);
  }
}

/**
 * The "added_tokens" array of a tokenizer.json, without parsing the whole file (BLOOM's is 14 MB
 * of vocabulary and merges; the library has already validated it).
 */
export function readAddedTokens(file: string): AddedTokenJson[] {
  const text = readFileSync(file, "utf8");
  const key = text.indexOf('"added_tokens"');
  if (key < 0) return [];
  const start = text.indexOf("[", key);
  let depth = 0, inString = false;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "[") depth++;
    else if (c === "]" && --depth === 0) {
      try {
        return JSON.parse(text.slice(start, i + 1)) as AddedTokenJson[];
      } catch (err) {
        throw new BlossomError("tokenizer", `${file}: "added_tokens" is not valid JSON (${(err as Error).message})`);
      }
    }
  }
  throw new BlossomError("tokenizer", `${file}: "added_tokens" is not a closed JSON array`);
}

/** Left-pads id lists to a common length; the mask is 0 on padding. */
export function padLeft(sequences: readonly (readonly number[])[], padTokenId: number): BatchEncoding {
  const width = Math.max(0, ...sequences.map((s) => s.length));
  const inputIds: number[][] = [];
  const attentionMask: number[][] = [];
  for (const s of sequences) {
    const pad = width - s.length;
    inputIds.push([...new Array<number>(pad).fill(padTokenId), ...s]);
    attentionMask.push([...new Array<number>(pad).fill(0), ...new Array<number>(s.length).fill(1)]);
  }
  return { inputIds, attentionMask };
}
