// Agent side of a video session, or of a phone call bridged to the browser: /agent/call?conversation=<id>.
// The staff token is the agent console's: sessionStorage "xiaozhi.agent" ({token, user}, the desk at /agent)
// or "xz_staff_token" (analytics and this page); without one, this page logs in itself.
"use strict";
(function () {
  const V = window.XZVideo;
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "xz_staff_token";
  const conversation = new URLSearchParams(location.search).get("conversation") || "";
  const state = { pc: null, stream: null, screen: null, screenSender: null, ws: null, ended: false, seen: new Set(), kind: "video" };
  window.xzCall = state;
  const DESK_KEY = "xiaozhi.agent";
  const token = () => {
    const own = sessionStorage.getItem(TOKEN_KEY);
    if (own) return own;
    try { return (JSON.parse(sessionStorage.getItem(DESK_KEY) || "null") || {}).token || null; } catch (e) { return null; }
  };
  const forget = () => { sessionStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(DESK_KEY); };

  function show(section) {
    ["login", "problem", "call", "ended"].forEach((id) => $(id).classList.toggle("hidden", id !== section));
  }
  function problem(text) { $("problemText").textContent = text; show("problem"); }

  async function open() {
    if (!conversation) return problem("链接里缺少会话编号，请从工作台的队列打开。");
    if (!token()) return show("login");
    let info;
    try {
      info = await V.api("GET", "/api/video/sessions/" + encodeURIComponent(conversation), token());
    } catch (e) {
      if (e.status === 401) { forget(); return show("login"); }
      return problem(e.message);
    }
    state.kind = info.channel === "phone" ? "phone" : "video";
    $("title").textContent = state.kind === "phone" ? "电话接听（来电 " + (info.contact || "未知号码") + "）" : "视频帮办";
    (info.messages || []).forEach((m) => V.appendMessage($("log"), m, state.seen));
    show("call");
    if (state.kind === "phone") {
      $("videoBox").classList.add("hidden");
      $("share").classList.add("hidden");
    }
    await connect(info);
  }

  async function connect(info) {
    try {
      state.stream = await navigator.mediaDevices.getUserMedia(
        state.kind === "phone" ? { audio: true } : { audio: true, video: info.capture || { width: 640, height: 480, frameRate: 15 } });
    } catch (e) {
      return problem("无法使用摄像头或麦克风，请检查设备后重试。");
    }
    $("self").srcObject = state.stream;
    const pc = new RTCPeerConnection({ iceServers: info.ice_servers || [] });
    state.pc = pc;
    state.stream.getTracks().forEach((t) => pc.addTrack(t, state.stream));
    if (state.kind === "video") {
      // A second video sender for the screen; getDisplayMedia fills it later with replaceTrack (no renegotiation).
      state.screenSender = pc.addTransceiver("video", { direction: "sendonly" }).sender;
    }
    const remote = new MediaStream();
    $(state.kind === "phone" ? "phoneAudio" : "remote").srcObject = remote;
    pc.ontrack = (e) => remote.addTrack(e.track);
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected") {
        $("status").textContent = state.kind === "phone" ? "已接通来电，请直接讲话。" : "已接通，居民能看到您、听到您。";
      }
      if (pc.connectionState === "failed") end("网络连接中断，通话已结束。");
    };
    state.ws = V.socket("/api/video/sessions/" + conversation + "/ws", token(), onEvent);
    state.ws.addEventListener("close", (e) => {
      if (e.code === 4401 || e.code === 4403) end("您的登录已失效或会话已不在您名下，通话已断开。");
    });
    try {
      await V.negotiate(pc, "/api/video/sessions/" + conversation + "/agent/offer", token());
    } catch (e) {
      pc.close(); state.pc = null; V.stopStream(state.stream);
      if (state.ws) state.ws.close();
      return problem(e.message);
    }
  }

  function onEvent(ev) {
    if (ev.type === "message") V.appendMessage($("log"), ev.message, state.seen);
    if (ev.type === "video" && ev.event === "ended") {
      const texts = { resident_hangup: "居民已挂断。", caller_hung_up: "来电已挂断。", agent_replaced: "另一位工作人员接手了这个通话。" };
      end(texts[ev.reason] || "通话已结束。");
    }
  }

  function end(text) {
    if (state.ended) return;
    state.ended = true;
    if (state.pc) state.pc.close();
    V.stopStream(state.stream);
    V.stopStream(state.screen);
    if (state.ws) state.ws.close();
    $("endedText").textContent = text;
    show("ended");
  }

  async function toggleShare() {
    if (state.screen) {
      V.stopStream(state.screen); state.screen = null;
      await state.screenSender.replaceTrack(null);
      $("share").textContent = "共享屏幕";
      return;
    }
    try {
      state.screen = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 15 } });
    } catch (e) {
      $("status").textContent = "没有开始屏幕共享。";
      return;
    }
    const track = state.screen.getVideoTracks()[0];
    track.onended = () => { if (state.screen) toggleShare(); };
    await state.screenSender.replaceTrack(track);
    $("share").textContent = "停止共享";
    $("status").textContent = "正在共享您的屏幕，居民能看到操作步骤。";
  }

  $("loginForm").onsubmit = async (e) => {
    e.preventDefault();
    try {
      const r = await V.api("POST", "/api/staff/login", null, { username: $("username").value, password: $("password").value });
      sessionStorage.setItem(TOKEN_KEY, r.token);
      $("loginError").textContent = "";
      open();
    } catch (err) { $("loginError").textContent = err.message; }
  };
  $("retry").onclick = () => { state.ended = false; open(); };
  $("share").onclick = toggleShare;
  $("hangup").onclick = async () => {
    try { await V.api("POST", "/api/video/sessions/" + conversation + "/hangup", token(), {}); } catch (e) { /* closing anyway */ }
    end("您已挂断，通话已结束。");
  };
  $("back").onclick = () => { location.href = "/agent"; };
  $("chatForm").onsubmit = async (e) => {
    e.preventDefault();
    const text = $("chatInput").value.trim();
    if (!text) return;
    try {
      const r = await V.api("POST", "/api/video/sessions/" + conversation + "/chat", token(), { text });
      V.appendMessage($("log"), r.message, state.seen);
      $("chatInput").value = "";
    } catch (err) { $("status").textContent = err.message; }
  };
  window.addEventListener("pagehide", () => {
    if (state.pc && !state.ended) {
      navigator.sendBeacon("/api/video/sessions/" + conversation + "/hangup",
        new Blob([JSON.stringify({ token: token() })], { type: "application/json" }));
    }
  });
  open();
})();
