// Shared by the resident page (/video) and the agent call page (/agent/call).
"use strict";
window.XZVideo = (function () {
  async function api(method, url, token, body) {
    const headers = { "content-type": "application/json" };
    if (token) headers.authorization = "Bearer " + token;
    const r = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = {};
    try { data = await r.json(); } catch (e) { /* empty body */ }
    if (!r.ok) {
      const err = new Error(data.message || "请求失败，请稍后再试。");
      err.status = r.status; err.code = data.error;
      throw err;
    }
    return data;
  }

  // aiortc answers with every candidate already in its SDP; we do the same (one round trip, no trickle).
  function gathered(pc, timeoutMs) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      pc.addEventListener("icegatheringstatechange", check);
      setTimeout(done, timeoutMs || 3000);
    });
  }

  async function negotiate(pc, url, token, extra) {
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 3000);
    const answer = await api("POST", url, token, Object.assign({ sdp: pc.localDescription.sdp, type: "offer" }, extra || {}));
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    return answer;
  }

  // Totals over inbound RTP streams (the tests and the benchmark read these).
  async function inbound(pc) {
    const out = { audioPackets: 0, videoPackets: 0, framesDecoded: 0 };
    if (!pc) return out;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      if (s.kind === "audio") out.audioPackets += s.packetsReceived || 0;
      if (s.kind === "video") { out.videoPackets += s.packetsReceived || 0; out.framesDecoded += s.framesDecoded || 0; }
    });
    return out;
  }

  function socket(path, token, onEvent) {
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(proto + location.host + path + "?token=" + encodeURIComponent(token));
    ws.onmessage = (e) => { try { onEvent(JSON.parse(e.data)); } catch (err) { console.error(err); } };
    const ping = setInterval(() => { if (ws.readyState === 1) ws.send("{}"); }, 20000);
    ws.onclose = () => clearInterval(ping);
    return ws;
  }

  const ROLE_NAMES = { resident: "居民", bot: "医保小智", agent: "工作人员", system: "系统" };

  function appendMessage(log, msg, seen) {
    if (seen.has(msg.seq)) return;
    seen.add(msg.seq);
    const div = document.createElement("div");
    div.className = "msg " + msg.role;
    if (msg.role !== "system") {
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = ROLE_NAMES[msg.role] || msg.role;
      div.appendChild(who);
    }
    div.appendChild(document.createTextNode(msg.text));
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
  }

  function stopStream(stream) { if (stream) stream.getTracks().forEach((t) => t.stop()); }

  return { api, negotiate, inbound, socket, appendMessage, stopStream };
})();
