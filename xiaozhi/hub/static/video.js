// Resident video help page: /video (kiosk: a new conversation) or /video#session_id=..&token=.. (from the chat widget).
"use strict";
(function () {
  const V = window.XZVideo;
  const $ = (id) => document.getElementById(id);
  const state = { sessionId: null, token: null, pc: null, stream: null, ws: null, ended: false, seen: new Set(), config: null };
  window.xzCall = state; // for tests and the benchmark: state.pc is the RTCPeerConnection

  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("session_id") && params.get("token")) {
    state.sessionId = params.get("session_id");
    state.token = params.get("token");
    history.replaceState(null, "", location.pathname); // keep the token out of the address bar
  }

  function show(section) {
    ["intro", "call", "ended"].forEach((id) => $(id).classList.toggle("hidden", id !== section));
  }

  // A kiosk gets its conversation only when the resident presses start (not for every page view).
  async function loadConfig() {
    if (state.sessionId) {
      state.config = await V.api("GET", "/api/video/sessions/" + state.sessionId, state.token);
    } else {
      state.config = await V.api("GET", "/api/video/config");
    }
    if (state.config.recording) {
      $("consent").textContent = state.config.consent_notice;
      $("consent").classList.remove("hidden");
      $("startNoRecord").classList.remove("hidden");
      $("start").textContent = "同意并开始视频";
    } else {
      $("start").textContent = "开始视频";
    }
  }

  async function start(consent) {
    $("introError").textContent = "";
    $("start").disabled = $("startNoRecord").disabled = true;
    try {
      if (!state.config) await loadConfig();
      try {
        state.stream = await navigator.mediaDevices.getUserMedia({
          audio: true, video: state.config.capture || { width: 640, height: 480, frameRate: 15 },
        });
      } catch (e) {
        throw new Error("无法使用摄像头或麦克风，请检查设备并允许本页面使用它们。");
      }
      if (!state.sessionId) {
        const created = await V.api("POST", "/api/video/sessions", null, {});
        state.sessionId = created.session_id;
        state.token = created.token;
        state.config = created;
      }
      show("call");
      $("status").textContent = "正在连接……";
      $("self").srcObject = state.stream;
      const pc = new RTCPeerConnection({ iceServers: state.config.ice_servers || [] });
      state.pc = pc;
      state.stream.getTracks().forEach((t) => pc.addTrack(t, state.stream));
      const screenTransceiver = pc.addTransceiver("video", { direction: "recvonly" }); // the agent's shared screen
      const remote = new MediaStream();
      $("remote").srcObject = remote;
      pc.ontrack = (e) => {
        if (e.transceiver === screenTransceiver) {
          $("screen").srcObject = new MediaStream([e.track]);
          e.track.onunmute = () => $("screenBox").classList.remove("hidden");
          e.track.onmute = () => $("screenBox").classList.add("hidden");
        } else {
          remote.addTrack(e.track);
        }
      };
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "failed") end("网络连接中断，视频通话已结束。");
      };
      state.ws = V.socket("/api/video/sessions/" + state.sessionId + "/ws", state.token, onEvent);
      const answer = await V.negotiate(pc, "/api/video/sessions/" + state.sessionId + "/resident/offer", state.token,
        { recording_consent: !!consent });
      $("rec").classList.toggle("hidden", !answer.recording);
      $("status").textContent = "正在为您接通工作人员，请稍候……";
      loadTranscript();
    } catch (e) {
      if (state.pc) { state.pc.close(); state.pc = null; }
      V.stopStream(state.stream);
      show("intro");
      $("introError").textContent = e.message;
      $("start").disabled = $("startNoRecord").disabled = false;
    }
  }

  async function loadTranscript() {
    try {
      const t = await V.api("GET", "/api/sessions/" + state.sessionId + "/messages", state.token);
      t.messages.forEach((m) => V.appendMessage($("log"), m, state.seen));
    } catch (e) { /* the transcript is a convenience here */ }
  }

  function onEvent(ev) {
    if (ev.type === "message") V.appendMessage($("log"), ev.message, state.seen);
    if (ev.type !== "video") return;
    if (ev.event === "agent_connected") $("status").textContent = "工作人员已接入，请对着摄像头说话。";
    if (ev.event === "agent_left") $("status").textContent = "工作人员已离开，正在为您安排其他工作人员，请稍候……";
    if (ev.event === "ended") {
      const texts = { agent_hangup: "工作人员已结束视频通话，感谢您的耐心。", no_agent_in_time: "等待时间过长，请稍后再试。" };
      end(texts[ev.reason] || "视频通话已结束，感谢您的使用。");
    }
  }

  function end(text) {
    if (state.ended) return;
    state.ended = true;
    if (state.pc) state.pc.close();
    V.stopStream(state.stream);
    if (state.ws) state.ws.close();
    $("endedText").textContent = text;
    show("ended");
  }

  async function hangup() {
    try { await V.api("POST", "/api/video/sessions/" + state.sessionId + "/hangup", state.token, {}); } catch (e) { /* closing anyway */ }
    end("您已挂断，视频通话已结束。感谢您的使用。");
  }

  $("start").onclick = () => start(true);
  $("startNoRecord").onclick = () => start(false);
  $("hangup").onclick = hangup;
  $("again").onclick = () => { location.href = "/video"; };
  $("chatForm").onsubmit = async (e) => {
    e.preventDefault();
    const text = $("chatInput").value.trim();
    if (!text) return;
    try {
      const r = await V.api("POST", "/api/video/sessions/" + state.sessionId + "/chat", state.token, { text });
      V.appendMessage($("log"), r.message, state.seen);
      $("chatInput").value = "";
    } catch (err) { $("status").textContent = err.message; }
  };
  window.addEventListener("pagehide", () => {
    if (state.pc && !state.ended) {
      navigator.sendBeacon("/api/video/sessions/" + state.sessionId + "/hangup",
        new Blob([JSON.stringify({ token: state.token })], { type: "application/json" }));
    }
  });
  loadConfig().catch((e) => { $("introError").textContent = e.message; });
})();
