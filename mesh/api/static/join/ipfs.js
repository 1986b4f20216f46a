// Fetch a UnixFS file by CID from the node that served the page (its trustless gateway, GET /ipfs/CID?format=raw,
// one block per request), verifying every block in the page: its sha256 against the CID's multihash, then
// dag-pb links parsed here (mesh/ipfs/dagpb.py, unixfs.py), raw leaves taken as they are. The node is not
// trusted for the bytes: a block that does not hash to the CID that names it stops the fetch.
/* eslint-disable no-bitwise */
import * as plain from "./crypto.js";
import { MeshError, base32, unbase32 } from "./mesh.js";

const DAG_PB = 0x70;
const RAW = 0x55;
const SHA2_256 = 0x12;
const MAX_BLOCK = 2 * 1024 * 1024;  // shoal chunks files in 256 KiB; other importers use up to 1 MiB
const MAX_DEPTH = 32;
const MAX_BLOCKS = 1 << 16;
const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
const subtle = globalThis.crypto?.subtle;  // absent outside a secure context: crypto.js hashes then

// ----- CIDs --------------------------------------------------------------------------------------------

function varint(bytes, offset) {
  let value = 0;
  let shift = 0;
  for (let i = offset; i < bytes.length && i < offset + 9; i++) {
    value += (bytes[i] & 0x7f) * 2 ** shift;
    if (!(bytes[i] & 0x80)) return [value, i + 1];
    shift += 7;
  }
  throw new MeshError("bad varint", "invalid_cid");
}

function base58(bytes) {
  const digits = [];  // little-endian base-58 digits
  for (const byte of bytes) {
    let carry = byte;
    for (let i = 0; i < digits.length; i++) {
      carry += digits[i] << 8;
      digits[i] = carry % 58;
      carry = Math.floor(carry / 58);
    }
    while (carry) { digits.push(carry % 58); carry = Math.floor(carry / 58); }
  }
  let out = "";
  for (const byte of bytes) { if (byte !== 0) break; out += "1"; }
  for (let i = digits.length - 1; i >= 0; i--) out += B58[digits[i]];
  return out;
}

function unbase58(text) {
  const bytes = [];  // little-endian
  for (const ch of text) {
    let carry = B58.indexOf(ch);
    if (carry < 0) throw new MeshError(`bad base58 character ${ch}`, "invalid_cid");
    for (let i = 0; i < bytes.length; i++) {
      carry += bytes[i] * 58;
      bytes[i] = carry & 0xff;
      carry >>= 8;
    }
    while (carry) { bytes.push(carry & 0xff); carry >>= 8; }
  }
  for (const ch of text) { if (ch !== "1") break; bytes.push(0); }
  return new Uint8Array(bytes.reverse());
}

/** A CID from its binary form: {version, codec, digest (the sha2-256 bytes), text}. Only sha2-256 CIDs of
 * dag-pb and raw blocks: what UnixFS files are made of. */
export function cidFromBytes(bytes) {
  if (bytes.length === 34 && bytes[0] === SHA2_256 && bytes[1] === 32) {
    return { version: 0, codec: DAG_PB, digest: bytes.slice(2), text: base58(bytes) };
  }
  let [version, at] = varint(bytes, 0);
  if (version !== 1) throw new MeshError(`CID version ${version} is not supported`, "invalid_cid");
  let codec;
  [codec, at] = varint(bytes, at);
  let hash;
  [hash, at] = varint(bytes, at);
  let length;
  [length, at] = varint(bytes, at);
  if (codec !== DAG_PB && codec !== RAW) throw new MeshError(`codec 0x${codec.toString(16)} is not a UnixFS block`, "invalid_cid");
  if (hash !== SHA2_256 || length !== 32 || bytes.length !== at + 32) throw new MeshError("only sha2-256 CIDs are verified here", "invalid_cid");
  return { version, codec, digest: bytes.slice(at), text: `b${base32(bytes)}` };
}

/** A CID from its text: CIDv0 (`Qm…`, base58btc) or CIDv1 in base32 (`b…`). */
export function parseCid(text) {
  if (typeof text !== "string" || text.length < 10 || text.length > 128) throw new MeshError("not a CID", "invalid_cid");
  if (text.startsWith("Qm") && text.length === 46) return cidFromBytes(unbase58(text));
  if (text.startsWith("b")) return cidFromBytes(unbase32(text.slice(1)));
  throw new MeshError("a CID must be CIDv0 (Qm…) or CIDv1 in base32 (b…)", "invalid_cid");
}

// ----- dag-pb and UnixFS -------------------------------------------------------------------------------

function* fields(bytes) {
  let at = 0;
  while (at < bytes.length) {
    let key;
    [key, at] = varint(bytes, at);
    const wire = key & 7;
    const field = Math.floor(key / 8);
    if (wire === 0) {
      let value;
      [value, at] = varint(bytes, at);
      yield [field, wire, value];
    } else if (wire === 2) {
      let length;
      [length, at] = varint(bytes, at);
      if (at + length > bytes.length) throw new MeshError("truncated protobuf field", "bad_block");
      yield [field, wire, bytes.subarray(at, at + length)];
      at += length;
    } else {
      throw new MeshError(`protobuf wire type ${wire} is not used by dag-pb`, "bad_block");
    }
  }
}

/** A dag-pb block's UnixFS file node: its inline data and its children [{cid, size}] in order. */
export function decodeFileNode(block) {
  const links = [];
  let data = null;
  for (const [field, wire, value] of fields(block)) {
    if (field === 2 && wire === 2) {
      let hash = null;
      let tsize = 0;
      for (const [f, w, v] of fields(value)) {
        if (f === 1 && w === 2) hash = v;
        else if (f === 3 && w === 0) tsize = v;
      }
      if (hash === null) throw new MeshError("dag-pb link without a hash", "bad_block");
      links.push({ cid: cidFromBytes(hash.slice()), tsize });
    } else if (field === 1 && wire === 2) {
      data = value;
    }
  }
  if (data === null) throw new MeshError("dag-pb node without UnixFS data", "bad_block");
  let type = null;
  let inline = new Uint8Array(0);
  let filesize = null;
  const sizes = [];
  for (const [f, w, v] of fields(data)) {
    if (f === 1 && w === 0) type = v;
    else if (f === 2 && w === 2) inline = v;
    else if (f === 3 && w === 0) filesize = v;
    else if (f === 4 && w === 0) sizes.push(v);
    else if (f === 4 && w === 2) for (const [, , s] of fields(packed(v))) sizes.push(s);
  }
  if (type !== 2 && type !== 0) throw new MeshError(`UnixFS type ${type} is not a file`, "bad_block");
  if (sizes.length !== links.length) throw new MeshError("UnixFS blocksizes do not match the links", "bad_block");
  return { data: inline, filesize, children: links.map((link, i) => ({ cid: link.cid, size: sizes[i] })) };
}

function packed(bytes) {  // repeated varints, packed: re-key them as field 0 varints for `fields`
  const out = [];
  let at = 0;
  while (at < bytes.length) {
    const start = at;
    [, at] = varint(bytes, at);
    out.push(0, ...bytes.subarray(start, at));
  }
  return new Uint8Array(out);
}

// ----- fetching ----------------------------------------------------------------------------------------

async function sha256(bytes) {
  return subtle ? new Uint8Array(await subtle.digest("SHA-256", bytes)) : plain.sha256(bytes);
}

/** Fetch the file `root` names, block by block, every block verified. `headers`: the API key, where the node
 * needs one. `onProgress(bytes, total)`; `maxBytes` bounds the file. Returns a Blob of the file's bytes. */
export async function fetchFile(root, { headers = {}, maxBytes = 1 << 30, onProgress = () => {}, parallel = 4, signal } = {}) {
  const rootCid = parseCid(root);
  let fetched = 0;
  let blocks = 0;
  let total = null;

  async function block(cid) {
    if (++blocks > MAX_BLOCKS) throw new MeshError(`more than ${MAX_BLOCKS} blocks`, "too_large");
    const response = await fetch(`/ipfs/${cid.text}?format=raw`, { headers: { ...headers, Accept: "application/vnd.ipld.raw" }, signal });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new MeshError(`block ${cid.text.slice(0, 16)}…: ${body.error?.message ?? response.status}`, body.error?.code ?? "unreachable");
    }
    const length = Number(response.headers.get("Content-Length") ?? 0);
    if (length > MAX_BLOCK) throw new MeshError(`block ${cid.text.slice(0, 16)}… is larger than ${MAX_BLOCK} bytes`, "too_large");
    const bytes = new Uint8Array(await response.arrayBuffer());
    if (bytes.length > MAX_BLOCK) throw new MeshError(`block ${cid.text.slice(0, 16)}… is larger than ${MAX_BLOCK} bytes`, "too_large");
    const digest = await sha256(bytes);
    if (digest.length !== cid.digest.length || digest.some((b, i) => b !== cid.digest[i])) {
      throw new MeshError(`block ${cid.text.slice(0, 16)}… does not match its CID`, "bad_block");
    }
    return bytes;
  }

  // the tree, depth first; leaves fetched `parallel` at a time, kept in file order
  async function walk(cid, depth, size) {
    if (depth > MAX_DEPTH) throw new MeshError("the DAG is too deep", "bad_block");
    const bytes = await block(cid);
    if (cid.codec === RAW) {
      if (size !== null && bytes.length !== size) throw new MeshError("a leaf's size differs from its parent's record", "bad_block");
      fetched += bytes.length;
      onProgress(fetched, total);
      return [bytes];
    }
    const node = decodeFileNode(bytes);
    if (depth === 0) {
      total = node.filesize;
      if (total === null || total > maxBytes) throw new MeshError(`the file is larger than ${maxBytes} bytes`, "too_large");
    }
    const parts = node.data.length ? [node.data.slice()] : [];
    fetched += node.data.length;
    const children = node.children;
    const results = new Array(children.length);
    let next = 0;
    const worker = async () => {
      while (next < children.length) {
        const i = next++;
        results[i] = await walk(children[i].cid, depth + 1, children[i].cid.codec === RAW ? children[i].size : null);
      }
    };
    await Promise.all(Array.from({ length: Math.min(parallel, children.length) }, worker));
    for (const r of results) parts.push(...r);
    return parts;
  }

  const parts = await walk(rootCid, 0, null);
  const blob = new Blob(parts);
  if (total !== null && blob.size !== total) throw new MeshError(`the file has ${blob.size} bytes, its root says ${total}`, "bad_block");
  onProgress(blob.size, blob.size);
  return blob;
}
