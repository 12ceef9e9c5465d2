// The plain chat page: one conversation kept across reloads, replies over WebSocket (HTTP as fallback).
(function () {
  "use strict";
  const log = document.getElementById("log");
  const form = document.getElementById("form");
  const input = document.getElementById("text");
  const status = document.getElementById("status");
  const KEY = "xiaozhi.session";
  const VISITOR_KEY = "xiaozhi.visitor";
  const shown = new Set();
  let session = null;
  let socket = null;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function render(message) {
    if (shown.has(message.seq)) return;
    shown.add(message.seq);
    const li = el("li", message.role);
    const bubble = el("div", "bubble", message.text);
    const meta = message.meta || {};
    if (message.role === "agent") bubble.insertBefore(el("span", "who", "工作人员" + (meta.agent_name || "") + "："), bubble.firstChild);
    if (meta.degraded) bubble.appendChild(el("span", "tag", "系统繁忙，此答复直接摘自政策资料库"));
    if (meta.steps && meta.steps.length) {
      const steps = el("ol");
      meta.steps.forEach(function (s) { steps.appendChild(el("li", "", s)); });
      bubble.appendChild(steps);
    }
    (meta.citations || []).forEach(function (c) {
      const cite = el("div", "cite", "来源：");
      const a = el("a", "", c.source.title);
      a.href = c.source.url; a.target = "_blank"; a.rel = "noopener";
      cite.appendChild(a);
      const when = c.verified === false ? "日期待核实" : c.effective_date;
      cite.appendChild(document.createTextNode("（" + c.region + "，" + when + "）"));
      bubble.appendChild(cite);
    });
    li.appendChild(bubble);
    log.appendChild(li);
    li.scrollIntoView({ block: "end" });
  }

  async function api(path, options) {
    const headers = { "Content-Type": "application/json" };
    if (session) headers.Authorization = "Bearer " + session.token;
    const res = await fetch(path, Object.assign({ headers: headers }, options));
    const body = await res.json().catch(function () { return {}; });
    if (!res.ok) throw Object.assign(new Error(body.message || "请求失败"), { status: res.status });
    return body;
  }

  // A random id kept in this browser so analytics can tell a visitor who comes back about the same
  // question within 72 hours (repeat contact); it names no one.
  function visitor() {
    let id = localStorage.getItem(VISITOR_KEY);
    if (!id) {
      const bytes = new Uint8Array(16);
      crypto.getRandomValues(bytes);
      id = Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
      localStorage.setItem(VISITOR_KEY, id);
    }
    return id;
  }

  async function start() {
    const saved = localStorage.getItem(KEY);
    if (saved) {
      session = JSON.parse(saved);
      try {
        const t = await api("/api/sessions/" + session.session_id + "/messages");
        t.messages.forEach(render);
      } catch (e) { session = null; }
    }
    if (!session) {
      session = await api("/api/sessions", { method: "POST", body: JSON.stringify({ visitor: visitor() }) });
      localStorage.setItem(KEY, JSON.stringify({ session_id: session.session_id, token: session.token }));
      render({ seq: 0, role: "bot", text: session.greeting });
    }
    connect();
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(proto + location.host + "/api/sessions/" + session.session_id + "/ws?token=" + encodeURIComponent(session.token));
    socket.onmessage = function (ev) {
      const event = JSON.parse(ev.data);
      if (event.type === "message") { render(event.message); if (event.message.role !== "resident") status.textContent = ""; }
      else if (event.type === "typing") status.textContent = "医保小智正在输入…";
      else if (event.type === "escalated") status.textContent = event.status === "callback" ? "已为您登记回电。" : "已为您排队转接人工客服。";
      else if (event.type === "agent_joined") status.textContent = "工作人员已接入。";
      else if (event.type === "agent_left") status.textContent = "";
      else if (event.type === "error") status.textContent = event.message;
    };
    socket.onclose = function () { socket = null; setTimeout(function () { if (!socket) connect(); }, 2000); };
  }

  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify({ text: text })); return; }
    status.textContent = "医保小智正在输入…";
    try {
      const r = await api("/api/sessions/" + session.session_id + "/messages", { method: "POST", body: JSON.stringify({ text: text }) });
      render(r.message); r.replies.forEach(render); status.textContent = "";
    } catch (e) { status.textContent = e.message; }
  });

  start().catch(function (e) { status.textContent = "连接失败：" + e.message; });
})();
