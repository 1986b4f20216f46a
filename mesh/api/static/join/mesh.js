// A browser tab as a shoal mesh member: the invite, an Ed25519 identity kept in IndexedDB, the signed
// signalling of mesh/p2p/signalling.py and links over the browser's own RTCPeerConnection with the three
// pre-negotiated channels of mesh/p2p/peer.py. No dependencies, no bundler: an ES module served by the node.
/* eslint-disable no-bitwise */

const enc = new TextEncoder();
const dec = new TextDecoder();
const B32 = "abcdefghijklmnopqrstuvwxyz234567";
const PEER_ID_LENGTH = 56;
const MAX_CLOCK_SKEW_S = 300;
const SIGNAL_FIELDS = new Set("v kind mesh from to name api sdp fp ts nonce re inv proof sig".split(" "));
export const CONTROL_LIMITS = {
  ping: 256, pong: 256, bye: 512, reply: 65536, error: 2048, advert: 65536, peers: 65536,
  signal: 32768, link: 512, "mesh.key": 1024,
};
const CHANNELS = [["control", 0], ["blocks", 1], ["tensors", 2]];
const BLOCK_WANT = 1;
const BLOCK_MISSING = 3;
const ABUSE_LIMIT = 5;

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
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
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
  return { name: String(data.n ?? "shoal").slice(0, 64), key, expires, mesh };
}

async function hmacHex(key, parts) {
  const imported = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const message = enc.encode(`shoal member\0${parts.join("\0")}`);
  return hex(await crypto.subtle.sign("HMAC", imported, message));
}

function proofParts(signal) {
  return [
    signal.mesh, signal.kind, signal.from, signal.to, signal.fp.join(","), signal.nonce, pyFloat(signal.ts),
    signal.re ?? "", ...("inv" in signal ? [String(signal.inv)] : []),
  ];
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
    keys = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    await storeOp(db, "readwrite", (s) => s.put({ privateKey: keys.privateKey, publicKey: keys.publicKey }, "self"));
  }
  db.close();
  const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", keys.publicKey));
  const id = peerIdFor(publicKey);
  return {
    id,
    name: `browser-${id.slice(-4)}`,
    sign: async (bytes) => new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, keys.privateKey, bytes)),
  };
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
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  let good = false;
  try {
    good = await crypto.subtle.verify({ name: "Ed25519" }, key, b64decode(signal.sig), enc.encode(canonical(withoutSig(signal))));
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

// ----- links ----------------------------------------------------------------------------------------------

function waitGathered(pc, timeoutMs) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

/** One link: control / blocks / tensors pre-negotiated (ids 0, 1, 2), heartbeats, requests, strikes. */
export class Link {
  constructor(mesh, offerer) {
    this.mesh = mesh;
    this.offerer = offerer;
    this.peerId = "?";
    this.name = "?";
    this.advert = {};
    this.rttMs = null;
    this.state = "connecting";
    this.abuse = 0;
    this.lastSeen = performance.now();
    this.nextId = offerer ? 1 : 2;
    this.pending = new Map();
    this.pc = new RTCPeerConnection({ iceServers: [] });
    this.channels = {};
    for (const [name, id] of CHANNELS) {
      const channel = this.pc.createDataChannel(name, { negotiated: true, id });
      channel.binaryType = "arraybuffer";
      channel.onmessage = (event) => this.receive(name, event.data);
      channel.onclose = () => this.close(`${name} channel closed`);
      this.channels[name] = channel;
    }
    this.pc.onconnectionstatechange = () => {
      if (["failed", "closed"].includes(this.pc.connectionState)) this.close(`connection ${this.pc.connectionState}`);
    };
  }

  async localDescription(kind) {
    const description = kind === "offer" ? await this.pc.createOffer() : await this.pc.createAnswer();
    await this.pc.setLocalDescription(description);
    await waitGathered(this.pc, 5000);
    return this.pc.localDescription.sdp;
  }

  waitOpen(timeoutMs) {
    const open = () => Object.values(this.channels).every((c) => c.readyState === "open");
    return new Promise((resolve, reject) => {
      const started = performance.now();
      const poll = () => {
        if (open()) return resolve();
        if (this.state === "closed" || performance.now() - started > timeoutMs) {
          return reject(new MeshError(`link to ${this.peerId.slice(0, 12)} did not open`, "unreachable"));
        }
        setTimeout(poll, 50);
      };
      poll();
    });
  }

  start() {
    this.state = "connected";
    this.connectedAt = Date.now() / 1000;
    this.lastSeen = performance.now();
    const { heartbeatMs, deadMs } = this.mesh.settings;
    this.timer = setInterval(() => {
      if (performance.now() - this.lastSeen > deadMs) return this.close(`dead: nothing heard for ${deadMs / 1000} s`);
      this.notify("ping", { t: performance.now() / 1000 + 0.0001 });
    }, heartbeatMs);
  }

  send(frame) {
    const text = JSON.stringify(frame);
    const channel = this.channels.control;
    if (channel.readyState !== "open") throw new MeshError("link is closed", "link_closed");
    if (enc.encode(text).length > (CONTROL_LIMITS[frame.t] ?? 0)) throw new MeshError(`${frame.t} frame too large`, "protocol");
    channel.send(text);
  }

  notify(type, body) {
    try {
      this.send({ v: 1, t: type, b: body });
    } catch (error) {
      console.debug("not sent", type, error);
    }
  }

  request(type, body, timeoutMs = 10000) {
    const id = this.nextId;
    this.nextId += 2;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.pending.delete(id); reject(new MeshError(`${type} got no reply`, "timeout")); }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send({ v: 1, t: type, b: body, id });
    });
  }

  strike(reason) {
    this.abuse += 1;
    console.warn(`peer ${this.peerId.slice(0, 12)}: protocol violation ${this.abuse}: ${reason}`);
    if (this.abuse >= ABUSE_LIMIT) this.close(`banned: ${reason}`);
    else this.notify("error", { code: "protocol", message: reason.slice(0, 500) });
  }

  receive(channelName, data) {
    if (this.state === "closed") return;
    this.lastSeen = performance.now();
    try {
      if (channelName === "control") this.onControl(decodeControl(data));
      else if (channelName === "blocks") this.onBlocks(data);
      else throw new MeshError("this member runs no stages", "protocol");
    } catch (error) {
      this.strike(error.message);
    }
  }

  onBlocks(data) {
    if (!(data instanceof ArrayBuffer) || data.byteLength < 16) throw new MeshError("short binary frame", "protocol");
    const view = new DataView(data);
    if (view.getUint8(0) !== 0x53 || view.getUint8(1) !== 0x46 || view.getUint8(2) !== 1) throw new MeshError("bad binary frame", "protocol");
    if (view.getUint8(3) !== BLOCK_WANT) return;
    const reply = new DataView(new ArrayBuffer(16));  // this tab holds no blocks: "missing"
    reply.setUint8(0, 0x53); reply.setUint8(1, 0x46); reply.setUint8(2, 1); reply.setUint8(3, BLOCK_MISSING);
    reply.setUint8(4, 1); reply.setUint32(8, view.getUint32(8, true), true);
    if (this.channels.blocks.readyState === "open") this.channels.blocks.send(reply.buffer);
  }

  onControl(frame) {
    if (frame.re !== undefined) {
      const waiter = this.pending.get(frame.re);
      if (!waiter) return;
      if (frame.t !== "reply" && frame.t !== "error") throw new MeshError(`a ${frame.t} frame cannot answer a request`, "protocol");
      this.pending.delete(frame.re);
      clearTimeout(waiter.timer);
      if (frame.t === "error") waiter.reject(new MeshError(String(frame.b.message ?? ""), String(frame.b.code ?? "error")));
      else waiter.resolve(frame.b);
      return;
    }
    switch (frame.t) {
      case "ping": this.notify("pong", frame.b); break;
      case "pong":
        if (typeof frame.b.t === "number") this.rttMs = Math.max(0, performance.now() - (frame.b.t - 0.0001) * 1000);
        break;
      case "link": break;  // large SCTP packets: this end keeps the standard size
      case "error": console.info(`peer ${this.peerId.slice(0, 12)} reports: ${String(frame.b.message).slice(0, 200)}`); break;
      case "bye": this.close("peer said bye"); break;
      case "advert":
        this.advert = frame.b;
        this.mesh.changed();
        break;
      case "peers": this.mesh.onPeers(this, frame.b); break;
      case "signal": this.mesh.onSignal(this, frame.b); break;
      case "mesh.key": this.answer(frame, () => this.mesh.onMeshKey(this, frame.b)); break;
      default:  // a type of another layer (stages, offloads): this tab serves none of them
        this.sendReply(frame, "error", { code: "unsupported", message: frame.t });
    }
  }

  answer(frame, work) {
    Promise.resolve().then(work).then(
      (body) => this.sendReply(frame, "reply", body ?? {}),
      (error) => this.sendReply(frame, "error", { code: error.code ?? "error", message: String(error.message).slice(0, 500) }),
    );
  }

  sendReply(frame, type, body) {
    if (frame.id === undefined) return;
    try {
      this.send({ v: 1, t: type, b: body, re: frame.id });
    } catch (error) {
      console.debug("reply not sent", error);
    }
  }

  close(reason, sayBye = false) {
    if (this.state === "closed") return;
    const wasConnected = this.state === "connected";
    if (sayBye) this.notify("bye", {});
    this.state = "closed";
    this.closeReason = reason;
    clearInterval(this.timer);
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new MeshError(`link closed: ${reason}`, "link_closed"));
    }
    this.pending.clear();
    this.pc.close();
    this.mesh.closed(this, reason, wasConnected);
  }
}

export function decodeControl(data) {
  const text = typeof data === "string" ? data : dec.decode(data);
  let frame;
  try {
    frame = JSON.parse(text);
  } catch {
    throw new MeshError("control frame is not JSON", "protocol");
  }
  if (frame === null || typeof frame !== "object" || Array.isArray(frame) || frame.v !== 1) throw new MeshError("malformed control frame", "protocol");
  if (typeof frame.t !== "string" || !/^[A-Za-z0-9_.]{1,64}$/.test(frame.t)) throw new MeshError("control frame type is not a name", "protocol");
  if (enc.encode(text).length > (CONTROL_LIMITS[frame.t] ?? 65536)) throw new MeshError(`${frame.t} frame exceeds its limit`, "protocol");
  frame.b = frame.b ?? {};
  if (typeof frame.b !== "object" || Array.isArray(frame.b)) throw new MeshError("control frame body is not an object", "protocol");
  for (const key of ["id", "re"]) {
    if (frame[key] !== undefined && !(Number.isInteger(frame[key]) && frame[key] >= 0 && frame[key] < 2 ** 32)) {
      throw new MeshError(`${key} must be an integer in [0, 2^32)`, "protocol");
    }
  }
  return frame;
}
