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
  let starting = null;
  let pending = null;
  let backoff = 1000;
  let queued = false; // waiting for a person: the status line keeps saying so while the bot answers
  let closed = false; // the conversation was ended (by an agent): the next question starts a new one
  let lastSent = null; // the question last sent over the WebSocket, until the hub takes or refuses it
  const QUEUED = "已为您排队转接人工客服。";
  function settle() { status.textContent = queued ? QUEUED : ""; }

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

  async function api(path, options, as) {
    const headers = { "Content-Type": "application/json" };
    const who = as || session;
    if (who) headers.Authorization = "Bearer " + who.token;
    const res = await fetch(path, Object.assign({ headers: headers }, options));
    const body = await res.json().catch(function () { return {}; });
    if (!res.ok) throw Object.assign(new Error(body.message || "请求失败"), { status: res.status });
    return body;
  }

  // What went wrong, in words for the resident: the hub's own message, or the browser's (English) one
  // replaced when the request never reached the hub.
  function reason(e) { return e.status ? e.message : "网络连接中断"; }

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

  // The conversation is only used once the hub has confirmed it: until then a question waits in
  // `pending` (and stays in the box) and is sent as soon as the conversation is there.
  async function start() {
    let old = null;
    try { old = JSON.parse(localStorage.getItem(KEY)); } catch (e) { old = null; } // unreadable: start afresh
    if (old && old.session_id) {
      try {
        const t = await api("/api/sessions/" + old.session_id + "/messages", undefined, old);
        if (t.status === "closed") throw Object.assign(new Error("closed"), { status: 409 });
        session = old;
        t.messages.forEach(render);
        queued = t.status === "escalated";
      } catch (e) { if (!e.status) throw e; } // refused (expired, closed): a new one below
    }
    if (!session) {
      const created = await api("/api/sessions", { method: "POST", body: JSON.stringify({ visitor: visitor() }) });
      localStorage.setItem(KEY, JSON.stringify({ session_id: created.session_id, token: created.token }));
      session = created;
      render({ seq: 0, role: "bot", text: created.greeting });
    }
    connect();
  }

  function begin() {
    if (starting) return;
    starting = start().then(function () {
      starting = null; backoff = 1000;
      if (pending) { const text = pending; pending = null; if (input.value.trim() === text) input.value = ""; send(text); }
      else settle();
    }, function (e) {
      starting = null;
      status.textContent = pending ? "暂时连不上，正在重试，连上后会自动发送您的问题。" : "连接失败：" + reason(e) + "，正在重试。";
      setTimeout(begin, backoff);
      backoff = Math.min(backoff * 2, 30000);
    });
  }

  function connect() {
    if (!session || socket) return;
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    try {
      socket = new WebSocket(proto + location.host + "/api/sessions/" + session.session_id + "/ws?token=" + encodeURIComponent(session.token));
    } catch (e) { // no WebSocket (a proxy that drops them): questions go over HTTP; try again later
      socket = null; setTimeout(connect, 30000); return;
    }
    socket.onmessage = function (ev) {
      const event = JSON.parse(ev.data);
      if (event.type === "message") {
        render(event.message);
        if (event.message.role === "resident") { if (event.message.text === lastSent) lastSent = null; } else settle();
      }
      else if (event.type === "typing") status.textContent = "医保小智正在输入…";
      else if (event.type === "escalated") { queued = event.status !== "callback"; status.textContent = queued ? QUEUED : "已为您登记回电。"; }
      else if (event.type === "agent_joined") { queued = false; status.textContent = "工作人员已接入。"; }
      else if (event.type === "agent_left") { queued = false; status.textContent = ""; }
      else if (event.type === "closed") { queued = false; closed = true; status.textContent = "本次对话已结束，再发送问题会开始新的对话。"; }
      else if (event.type === "error" && event.error === "conversation_closed") { const again = lastSent; lastSent = null; restart(again); }
      else if (event.type === "error") {
        // refused (too long, too fast, a failed turn): nothing typed is lost, the question goes back into the box
        if (lastSent && !input.value.trim()) input.value = lastSent;
        lastSent = null;
        status.textContent = event.message;
      }
    };
    socket.onclose = function () { socket = null; setTimeout(function () { if (!socket) connect(); }, 2000); };
  }

  // The conversation is over: a new one is started, and the question (if any) is sent there.
  function restart(text) {
    const old = socket;
    socket = null;
    if (old) { old.onclose = old.onmessage = null; try { old.close(); } catch (e) { /* already closed */ } }
    session = null; queued = false; closed = false;
    localStorage.removeItem(KEY);
    if (text) { pending = text; if (!input.value.trim()) input.value = text; }
    status.textContent = "上一个对话已经结束，正在为您开始新的对话。";
    begin();
  }

  function send(text) {
    status.textContent = "医保小智正在输入…";
    if (socket && socket.readyState === WebSocket.OPEN) { lastSent = text; socket.send(JSON.stringify({ text: text })); return; }
    api("/api/sessions/" + session.session_id + "/messages", { method: "POST", body: JSON.stringify({ text: text }) }).then(function (r) {
      render(r.message); r.replies.forEach(render); settle();
    }, function (e) {
      // nothing typed is lost: the question goes back into the box to be sent again
      if (!input.value.trim()) input.value = text;
      status.textContent = reason(e) + "。您的问题还在输入框里，请稍后再点“发送”。";
    });
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    if (closed) { restart(text); return; } // the question stays in the box and goes to a new conversation
    if (!session) { // still connecting: the question stays in the box and is sent once connected
      pending = text;
      status.textContent = "正在连接，连上后会自动发送您的问题，请稍候。";
      begin();
      return;
    }
    input.value = "";
    send(text);
  });

  begin();
})();
