// A browser tab as a shoal mesh member, part 1: the invite (mesh/p2p/invite.py), an Ed25519 identity kept in
// IndexedDB (mesh/p2p/identity.py) and the signed signalling of mesh/p2p/signalling.py. Links are in link.js.
// No dependencies, no bundler: ES modules served by the node. WebCrypto where the page has it (a secure
// context: https, localhost), crypto.js otherwise (a phone on http://LAN-ADDRESS/join).
/* eslint-disable no-bitwise */
import * as plain from "./crypto.js";

const enc = new TextEncoder();
const dec = new TextDecoder();
const B32 = "abcdefghijklmnopqrstuvwxyz234567";
const PEER_ID_LENGTH = 56;
const MAX_CLOCK_SKEW_S = 300;
const SIGNAL_FIELDS = new Set("v kind mesh from to name api sdp fp ts nonce re inv proof sig".split(" "));
const subtle = globalThis.crypto?.subtle;  // undefined outside a secure context

export class MeshError extends Error {
  constructor(message, code = "refused") {
    super(message);
    this.code = code;
  }
}

// ----- encodings ------------------------------------------------------------------------------------------

export function base32(bytes) {
  let value = 0;
  let bits = 0;
  let out = "";
  for (const byte of bytes) {
    value = ((value << 8) | byte) & 0xffff;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

export function unbase32(text) {
  const out = [];
  let value = 0;
  let bits = 0;
  for (const ch of text) {
    const index = B32.indexOf(ch);
    if (index < 0) throw new MeshError(`bad base32 character ${ch}`, "invalid_signal");
    value = ((value << 5) | index) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 255);
      bits -= 8;
    }
  }
  return new Uint8Array(out);
}

function b64encode(bytes) {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text);
}

function b64decode(text) {
  const raw = atob(text);
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

async function sha256(bytes) {
  return subtle ? new Uint8Array(await subtle.digest("SHA-256", bytes)) : plain.sha256(bytes);
}

/** Python's repr() of a float for the few values signalling uses (unix times). */
function pyFloat(value) {
  return Number.isInteger(value) ? `${value}.0` : String(value);
}

/** orjson.dumps(..., OPT_SORT_KEYS) of a signal: sorted keys, compact, `ts` always a float. */
export function canonical(value, key = "") {
  if (Array.isArray(value)) return `[${value.map((v) => canonical(v)).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k], k)}`).join(",")}}`;
  }
  if (key === "ts" && typeof value === "number") return pyFloat(value);
  return JSON.stringify(value);
}

// ----- invite and membership --------------------------------------------------------------------------

export async function meshIdFor(secret) {
  const digest = await sha256(concat(enc.encode("shoal mesh id\0"), secret));
  return `m${base32(digest.slice(0, 10))}`;
}

/** Parse `shoal1-…` (or a join URL holding it after `#`) like mesh/p2p/invite.py. */
export async function parseInvite(text) {
  let token = String(text).replace(/\s+/g, "");
  if (token.includes("#") && !token.startsWith("shoal1-")) token = token.slice(token.indexOf("#") + 1);
  if (!token.startsWith("shoal1-")) throw new MeshError("not a shoal invite (it starts with shoal1-)", "invalid_invite");
  let raw;
  try {
    const body = token.slice(7).replace(/-/g, "+").replace(/_/g, "/");
    raw = b64decode(body + "=".repeat((4 - (body.length % 4)) % 4));
  } catch {
    throw new MeshError("the invite is not valid base64url (cut off?)", "invalid_invite");
  }
  const body = raw.slice(0, -4);
  const check = (await sha256(body)).slice(0, 4);
  if (raw.length < 5 || check.some((b, i) => b !== raw[raw.length - 4 + i])) {
    throw new MeshError("the invite's checksum does not match (cut off or mistyped?)", "invalid_invite");
  }
  const data = JSON.parse(dec.decode(body));
  const expires = Number.isInteger(data.e) ? data.e : null;
  const key = b64decode(expires === null ? data.s : data.k);
  if (key.length < 16) throw new MeshError("the invite's secret is too short", "invalid_invite");
  const mesh = expires === null ? await meshIdFor(key) : String(data.m);
  const servers = (Array.isArray(data.i) ? data.i : [])
    .filter((url) => typeof url === "string" && url.length <= 300 && /^(stuns?|turns?):/.test(url)).slice(0, 8);
  const t = data.t;  // an expiring invite's TURN REST credential, which expires with it
  const turn = Array.isArray(t) && t.length === 2 && t.every((x) => typeof x === "string" && x.length <= 300)
    ? { username: t[0], credential: t[1] } : null;
  return { name: String(data.n ?? "shoal").slice(0, 64), key, expires, mesh, servers, turn };
}

async function hmacHex(key, parts) {
  return hex(await hmac("SHA-256", key, enc.encode(`shoal member\0${parts.join("\0")}`)));
}

function proofParts(signal) {
  return [
    signal.mesh, signal.kind, signal.from, signal.to, signal.fp.join(","), signal.nonce, pyFloat(signal.ts),
    signal.re ?? "", ...("inv" in signal ? [String(signal.inv)] : []),
  ];
}

/** The RTCPeerConnection ICE servers of the invite's STUN/TURN URLs (mesh/p2p/relays.py): TURN with REST
 * credentials derived from the mesh secret (username `EXPIRY:MESH_ID`, valid a day), or, on an expiring
 * invite, the credential it carries until it expires. */
export async function iceServers(membership, nowS = Date.now() / 1000) {
  const stun = membership.servers.filter((url) => url.startsWith("stun"));
  const turn = membership.servers.filter((url) => url.startsWith("turn"));
  const out = stun.length ? [{ urls: stun }] : [];
  let credential = null;
  if (membership.expires === null) credential = await turnCredentials(membership.key, membership.mesh, nowS);
  else if (membership.turn && nowS <= membership.expires) credential = membership.turn;
  if (turn.length && credential) out.push({ urls: turn, ...credential });
  return out;
}

export async function turnCredentials(secret, meshId, nowS, ttlS = 24 * 3600) {
  const restSecret = enc.encode(hex(await hmac("SHA-256", secret, enc.encode("shoal turn rest secret v1"))));
  const username = `${Math.floor(nowS + ttlS)}:${meshId}`;
  return { username, credential: b64encode(await hmac("SHA-1", restSecret, enc.encode(username))) };
}

async function hmac(hash, key, message) {
  if (!subtle) return hash === "SHA-1" ? plain.hmacSha1(key, message) : plain.hmacSha256(key, message);
  const imported = await subtle.importKey("raw", key, { name: "HMAC", hash }, false, ["sign"]);
  return new Uint8Array(await subtle.sign("HMAC", imported, message));
}

// ----- identity -------------------------------------------------------------------------------------------

export function peerIdFor(publicKey) {
  return `p${base32(concat(new Uint8Array([0xed, 0x01]), publicKey))}`;
}

function publicKeyOf(peerId) {
  if (typeof peerId !== "string" || peerId.length !== PEER_ID_LENGTH || peerId[0] !== "p") {
    throw new MeshError("malformed peer id", "invalid_signal");
  }
  const raw = unbase32(peerId.slice(1));
  if (raw.length !== 34 || raw[0] !== 0xed || raw[1] !== 0x01) throw new MeshError("not an ed25519 peer id", "invalid_signal");
  return raw.slice(2);
}

function openStore() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open("shoal", 1);
    request.onupgradeneeded = () => request.result.createObjectStore("identity");
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function storeOp(db, mode, op) {
  return new Promise((resolve, reject) => {
    const request = op(db.transaction("identity", mode).objectStore("identity"));
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/** This tab's identity: an Ed25519 key made by WebCrypto (private key not extractable), kept in IndexedDB. */
export async function loadIdentity() {
  const db = await openStore();
  let keys = await storeOp(db, "readonly", (s) => s.get("self"));
  if (!keys) {
    try {  // a WebCrypto key whose private half no script can read
      keys = await subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      keys = { privateKey: keys.privateKey, publicKey: keys.publicKey };
    } catch {  // no secure context (or no Ed25519 in this browser's WebCrypto): a seed, signed with crypto.js
      keys = { seed: crypto.getRandomValues(new Uint8Array(32)) };
    }
    await storeOp(db, "readwrite", (s) => s.put(keys, "self"));
  }
  db.close();
  const { seed, privateKey } = keys;
  const publicKey = seed ? plain.ed25519PublicKey(seed) : new Uint8Array(await subtle.exportKey("raw", keys.publicKey));
  const id = peerIdFor(publicKey);
  return {
    id,
    name: `browser-${id.slice(-4)}`,
    webcrypto: !seed,
    sign: async (bytes) => (seed ? plain.ed25519Sign(seed, bytes)
      : new Uint8Array(await subtle.sign({ name: "Ed25519" }, privateKey, bytes))),
  };
}

const ed25519InWebCrypto = subtle
  ? subtle.generateKey({ name: "Ed25519" }, false, ["sign"]).then(() => true, () => false)
  : Promise.resolve(false);

async function verifyEd25519(publicKey, signature, message) {
  if (!(await ed25519InWebCrypto)) return plain.ed25519Verify(publicKey, signature, message);
  try {
    const key = await subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
    return await subtle.verify({ name: "Ed25519" }, key, signature, message);
  } catch {
    return false;
  }
}

// ----- signalling -----------------------------------------------------------------------------------------

export function sdpFingerprints(sdp) {
  const out = [];
  for (const m of sdp.matchAll(/^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$/gm)) out.push(`${m[1].toLowerCase()} ${m[2].toUpperCase()}`);
  return out;
}

function withoutSig(signal) {
  const copy = { ...signal };
  delete copy.sig;
  return copy;
}

export async function buildSignal(identity, membership, kind, sdp, to = "", replyTo = "") {
  let ts = Date.now() / 1000;
  if (Number.isInteger(ts)) ts += 0.0005;
  const nonce = hex(crypto.getRandomValues(new Uint8Array(16)));
  const signal = {
    v: 1, kind, mesh: membership.mesh, from: identity.id, to, name: identity.name, api: "", sdp,
    fp: sdpFingerprints(sdp), ts, nonce,
  };
  if (replyTo) signal.re = replyTo;
  if (membership.expires !== null) signal.inv = membership.expires;
  signal.proof = await hmacHex(membership.key, proofParts(signal));
  signal.sig = b64encode(await identity.sign(enc.encode(canonical(signal))));
  return signal;
}

/** The checks of signalling.verify_signal, for signals this tab receives. */
export async function verifySignal(signal, membership, myId, kind) {
  const fail = (message, code = "invalid_signal") => { throw new MeshError(message, code); };
  if (signal === null || typeof signal !== "object" || Array.isArray(signal)) fail("signal is not an object");
  if (Object.keys(signal).some((k) => !SIGNAL_FIELDS.has(k)) || signal.v !== 1) fail("unknown signal fields or version", "unsupported_version");
  if (signal.kind !== kind) fail(`expected an ${kind}`);
  for (const key of ["from", "to", "sdp", "name", "api", "nonce", "mesh", "proof", "sig"]) {
    if (typeof signal[key] !== "string") fail(`signal field ${key} must be a string`);
  }
  const publicKey = publicKeyOf(signal.from);
  if (signal.from === myId) fail("signal claims to come from this tab", "self");
  if (signal.to && signal.to !== myId) fail("signal is addressed to another member", "wrong_addressee");
  if (!Array.isArray(signal.fp) || !signal.fp.every((f) => typeof f === "string")) fail("fp must be a list of strings");
  if (typeof signal.ts !== "number" || Math.abs(Date.now() / 1000 - signal.ts) > MAX_CLOCK_SKEW_S) fail("stale signal", "stale");
  let good = false;
  try {
    good = await verifyEd25519(publicKey, b64decode(signal.sig), enc.encode(canonical(withoutSig(signal))));
  } catch {
    good = false;
  }
  if (!good) fail(`bad signature on ${kind} from ${signal.from.slice(0, 12)}`, "bad_signature");
  if (signal.fp.length === 0 || signal.fp.join("\n") !== sdpFingerprints(signal.sdp).join("\n")) fail("DTLS fingerprints differ", "bad_signature");
  if (signal.mesh !== membership.mesh) fail(`${signal.from.slice(0, 12)} belongs to another mesh`, "foreign_mesh");
  const inv = "inv" in signal ? signal.inv : null;
  if (inv !== membership.expires) {
    fail("this tab holds only an invite so far, not the mesh secret", membership.expires === null ? "not_member" : "invite_only");
  }
  if (signal.proof !== await hmacHex(membership.key, proofParts(signal))) fail(`${signal.from.slice(0, 12)} proved no membership`, "not_member");
  return signal;
}
