// A browser tab as a shoal mesh member, part 2: one link over the browser's own RTCPeerConnection with the
// three pre-negotiated channels of mesh/p2p/peer.py and the control frames of mesh/p2p/protocol.py.
/* eslint-disable no-bitwise */
import { MeshError } from "./mesh.js";

const enc = new TextEncoder();
const dec = new TextDecoder();
export const CONTROL_LIMITS = {
  ping: 256, pong: 256, bye: 512, reply: 65536, error: 2048, advert: 65536, peers: 65536,
  signal: 32768, link: 512, "mesh.key": 1024,
  // offloads this tab serves (mesh/split/wire.py's limits)
  "offload.open": 196608, "offload.cancel": 256, "offload.token": 6144, "offload.done": 8192, "offload.error": 2048,
};
const CHANNELS = [["control", 0], ["blocks", 1], ["tensors", 2]];
const BLOCK_WANT = 1;
const BLOCK_MISSING = 3;
const ABUSE_LIMIT = 5;


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
    this.offer = { ts: 0, nonce: "" };  // the offer it was made from, which both ends hold (member.js register)
    // settles on the peer's first ping (that end has started this link too) or when the link closes
    this.peerStarted = new Promise((resolve) => { this.markPeerStarted = resolve; });
    this.abuse = 0;
    this.lastSeen = performance.now();
    this.nextId = offerer ? 1 : 2;
    this.pending = new Map();
    this.pc = new RTCPeerConnection({ iceServers: mesh.iceServers });
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
    const beat = () => {
      if (performance.now() - this.lastSeen > deadMs) return this.close(`dead: nothing heard for ${deadMs / 1000} s`);
      this.notify("ping", { t: performance.now() / 1000 + 0.0001 });
    };
    this.timer = setInterval(beat, heartbeatMs);
    beat();  // at once, as a node's heartbeat: the peer learns that this end has started the link
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
      case "ping":
        this.markPeerStarted();
        this.notify("pong", frame.b);
        break;
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
      case "offload.open":
        this.answer(frame, () => {
          if (!this.mesh.compute) throw new MeshError("this browser member runs no models", "refused");
          return this.mesh.compute.open(this, frame.b);
        });
        break;
      case "offload.cancel": this.mesh.compute?.cancel(this, frame.b); break;
      default:  // a type of another layer (stages, offload.info/tokenize): this tab serves none of them
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
    this.markPeerStarted();  // nothing more to wait for (member.js retire)
    this.mesh.compute?.linkClosed(this);
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
