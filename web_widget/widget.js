/*! 医保小智 web widget — one <script> tag, no framework, Shadow DOM. Apache-2.0.
 * <script src="https://hub.example/widget.js" data-server="https://hub.example"
 *         data-color="#0b6bcb" data-position="right" data-region="330100" async></script>
 * Talks only to the hub's public chat API (sessions, messages, WebSocket, escalate, survey).
 */
(function () {
  "use strict";
  if (window.__xiaozhiWidget) return;
  var script = document.currentScript || (function () {
    var all = document.querySelectorAll("script[src*='widget.js']");
    return all[all.length - 1];
  })();
  var data = (script && script.dataset) || {};
  var SERVER = (data.server || (script ? new URL(script.src, location.href).origin : location.origin)).replace(/\/+$/, "");
  var COLOR = /^#[0-9a-fA-F]{3,8}$|^[a-z]+$/.test(data.color || "") ? data.color : "#0b6bcb";
  var SIDE = data.position === "left" ? "left" : "right";
  var REGION = /^\d{6}$/.test(data.region || "") ? data.region : null;
  var KEY = "xiaozhi.widget:" + SERVER;
  var VISITOR_KEY = "xiaozhi.visitor:" + SERVER;
  var PREFS = "xiaozhi.widget.prefs";

  var CSS = [
    ":host{all:initial}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'PingFang SC','Microsoft YaHei','Noto Sans CJK SC',sans-serif}",
    ".root{--c:" + COLOR + ";--bg:#fff;--fg:#1d2129;--muted:#5c6370;--bub:#f2f4f7;--line:#d0d5dd;font-size:15px;line-height:1.55;color:var(--fg);position:fixed;bottom:20px;" + SIDE + ":20px;z-index:2147483000}",
    ".root.big{font-size:20px}",
    ".root.hc{--c:#ffd400;--bg:#000;--fg:#fff;--muted:#fff;--bub:#111;--line:#fff}",
    "button{font:inherit;cursor:pointer}",
    ":focus-visible{outline:3px solid #ff8a00;outline-offset:2px}",
    ".launch{background:var(--c);color:#fff;border:0;border-radius:28px;padding:12px 20px;box-shadow:0 4px 14px rgba(0,0,0,.25);font-size:1em}",
    ".hc .launch{color:#000}",
    ".panel{display:none;flex-direction:column;width:380px;max-width:calc(100vw - 24px);height:600px;max-height:calc(100vh - 40px);background:var(--bg);border:1px solid var(--line);border-radius:14px;box-shadow:0 10px 40px rgba(0,0,0,.3);overflow:hidden}",
    ".open .panel{display:flex}.open .launch{display:none}",
    "header{display:flex;align-items:center;gap:6px;background:var(--c);color:#fff;padding:10px 12px}",
    ".hc header{color:#000}",
    "header h2{flex:1;margin:0;font-size:1.05em}",
    "header button{background:transparent;border:1px solid currentColor;color:inherit;border-radius:6px;padding:2px 8px;font-size:.85em}",
    ".log{flex:1;overflow-y:auto;margin:0;padding:12px;list-style:none}",
    ".log>li{display:flex;margin:8px 0}.log>li.resident{justify-content:flex-end}",
    ".b{max-width:85%;padding:8px 12px;border-radius:12px;background:var(--bub);white-space:pre-wrap;word-break:break-word}",
    ".resident .b{background:var(--c);color:#fff}.hc .resident .b{color:#000}",
    ".system .b,.agent .b{border:1px solid var(--line)}",
    ".who{display:block;font-size:.8em;color:var(--muted)}",
    ".steps{list-style:none;padding:0;margin:6px 0 0}.steps li{display:flex;gap:6px;align-items:flex-start;margin:3px 0}",
    ".steps input{width:1.1em;height:1.1em;margin-top:.25em;accent-color:var(--c)}",
    ".cite{margin-top:6px;padding-top:6px;border-top:1px dashed var(--line);font-size:.85em;color:var(--muted)}",
    ".cite a{color:inherit;text-decoration:underline}",
    ".tag{display:inline-block;margin-left:4px;padding:0 6px;border-radius:8px;background:#fff3cd;color:#6b4e00;font-size:.75em}",
    ".opts{display:flex;flex-wrap:wrap;gap:6px;margin-top:8px}",
    ".opts button,.rate button{border:1px solid var(--c);background:var(--bg);color:var(--fg);border-radius:16px;padding:4px 12px}",
    ".rate button[aria-pressed=true]{background:var(--c);color:#fff}.hc .rate button[aria-pressed=true]{color:#000}",
    ".typing{min-height:1.6em;padding:0 12px;color:var(--muted);font-size:.9em}",
    ".tools{display:flex;gap:6px;padding:6px 10px;border-top:1px solid var(--line)}",
    ".tools button{flex:1;border:1px solid var(--c);background:var(--bg);color:var(--fg);border-radius:8px;padding:6px}",
    ".tools button[hidden],.confirm[hidden]{display:none}",
    ".confirm{display:flex;flex-wrap:wrap;align-items:center;gap:6px;padding:8px 10px;border-top:1px solid var(--line)}",
    ".confirm p{flex-basis:100%;margin:0}.confirm button{flex:1;border:1px solid var(--c);background:var(--bg);color:var(--fg);border-radius:8px;padding:6px}",
    ".confirm .yes{background:var(--c);color:#fff}.hc .confirm .yes{color:#000}",
    "form{display:flex;gap:6px;padding:8px 10px 10px}",
    "textarea{flex:1;resize:none;font:inherit;padding:8px;border:1px solid var(--line);border-radius:8px;background:var(--bg);color:var(--fg);height:2.8em}",
    "form button{background:var(--c);color:#fff;border:0;border-radius:8px;padding:0 16px}.hc form button{color:#000}",
    ".q{margin:0}",
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}",
    ".survey .b{max-width:100%;flex:1}.survey textarea{width:100%;margin-top:6px}.survey .send{margin-top:6px;background:var(--c);color:#fff;border:0;border-radius:8px;padding:4px 14px}.hc .survey .send{color:#000}",
    // phones: the whole screen, and touch targets of at least 44 px
    "@media (max-width:480px){.root.open{top:0;bottom:0;left:0;right:0}.open .panel{width:100vw;max-width:100vw;height:100%;max-height:none;border-radius:0}" +
      "header button,.tools button,.confirm button,form button,.opts button,.rate button,.survey .send{min-height:44px;min-width:44px}}"
  ].join("\n");

  var prefs = load(PREFS) || {};
  var session = load(KEY);
  var shown = {};
  var lastSeq = 0;
  var socket = null;
  var backoff = 1000;
  var retryTimer = null;
  var started = false;
  var surveyShown = false;
  var withAgent = false; // an agent holds the conversation: the bot does not type
  var queued = false; // waiting for an agent: the status line keeps saying so while the bot answers
  var QUEUED = "已为您转接人工客服，正在排队，请稍候。";
  var ended = false; // this conversation is closed; the next question starts a new one
  var pending = null; // a question asked while there was no conversation to send it to
  var lastSent = null; // the last question sent over the WebSocket (re-sent if it was refused as closed)
  var SURVEY_OPEN = ["pending", "offered", "calling"];

  function load(k) { try { return JSON.parse(localStorage.getItem(k) || "null"); } catch (e) { return null; } }
  function save(k, v) { try { localStorage.setItem(k, JSON.stringify(v)); } catch (e) { /* private mode: session lasts the page */ } }
  // A random id kept in this browser: analytics tells a visitor who comes back about the same
  // question within 72 hours (repeat contact). It names no one.
  function visitor() {
    var id = load(VISITOR_KEY);
    if (typeof id !== "string" || !/^[0-9a-f]{32}$/.test(id)) {
      var bytes = new Uint8Array(16);
      (window.crypto || window.msCrypto).getRandomValues(bytes);
      id = Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
      save(VISITOR_KEY, id);
    }
    return id;
  }
  function el(tag, attrs, text) {
    var n = document.createElement(tag);
    for (var a in attrs || {}) {
      if (a === "class") n.className = attrs[a]; else if (a.slice(0, 2) === "on") n.addEventListener(a.slice(2), attrs[a]); else n.setAttribute(a, attrs[a]);
    }
    if (text != null) n.textContent = text;
    return n;
  }

  // ---- DOM (inside a closed-to-host-CSS shadow root) -----------------------------------------
  var host = el("div", { id: "xiaozhi-widget", "data-xiaozhi": "" });
  var shadow = host.attachShadow({ mode: "open" });
  // A constructed stylesheet is not an inline <style>: host pages with a strict CSP (style-src 'self') still style the widget.
  try { var sheet = new CSSStyleSheet(); sheet.replaceSync(CSS); shadow.adoptedStyleSheets = [sheet]; }
  catch (e) { var style = el("style"); style.textContent = CSS; shadow.appendChild(style); }
  var root = el("div", { class: "root", lang: "zh-CN" });
  var launch = el("button", { class: "launch", type: "button", "aria-haspopup": "dialog", "aria-expanded": "false", "aria-controls": "xz-panel" });
  launch.append(el("span", { "aria-hidden": "true" }, "💬 "), "医保咨询");
  var panel = el("section", { class: "panel", id: "xz-panel", role: "dialog", "aria-modal": "false", "aria-labelledby": "xz-title" });
  var head = el("header");
  var title = el("h2", { id: "xz-title" }, "医保小智 在线咨询");
  var bigBtn = el("button", { type: "button", "aria-pressed": String(!!prefs.big), title: "放大字号" }, "大字");
  var hcBtn = el("button", { type: "button", "aria-pressed": String(!!prefs.hc), title: "高对比度显示" }, "高对比");
  var closeBtn = el("button", { type: "button", "aria-label": "关闭咨询窗口" }, "✕");
  head.append(title, bigBtn, hcBtn, closeBtn);
  var log = el("ol", { class: "log", role: "log", "aria-live": "polite", "aria-relevant": "additions", "aria-label": "对话记录", tabindex: "0" });
  var typing = el("div", { class: "typing", role: "status", "aria-live": "polite" });
  var tools = el("div", { class: "tools", role: "group", "aria-label": "更多服务" });
  var humanBtn = el("button", { type: "button" }, "转人工");
  var videoBtn = el("button", { type: "button", "aria-label": "视频办理（在新窗口打开）" }, "视频办理");
  var endBtn = el("button", { type: "button" }, "结束对话");
  var newBtn = el("button", { type: "button", hidden: "" }, "开始新的对话");
  tools.append(humanBtn, videoBtn, endBtn, newBtn);
  var confirmBar = el("div", { class: "confirm", role: "group", "aria-labelledby": "xz-confirm", hidden: "" });
  var confirmYes = el("button", { type: "button", class: "yes" }, "确定结束");
  var confirmNo = el("button", { type: "button" }, "继续咨询");
  confirmBar.append(el("p", { id: "xz-confirm" }, "确定要结束本次对话吗？结束后工作人员将无法继续在这里回复您。"), confirmYes, confirmNo);
  var form = el("form", { "aria-label": "发送消息" });
  var label = el("label", { for: "xz-input", class: "sr" }, "输入您的问题");
  var input = el("textarea", { id: "xz-input", rows: "1", maxlength: "1000", placeholder: "请输入您的问题" });
  var send = el("button", { type: "submit" }, "发送");
  form.append(label, input, send);
  panel.append(head, log, typing, confirmBar, tools, form);
  root.append(launch, panel);
  shadow.appendChild(root);
  applyPrefs();

  function applyPrefs() {
    root.classList.toggle("big", !!prefs.big);
    root.classList.toggle("hc", !!prefs.hc);
    bigBtn.setAttribute("aria-pressed", String(!!prefs.big));
    hcBtn.setAttribute("aria-pressed", String(!!prefs.hc));
  }
  bigBtn.addEventListener("click", function () { prefs.big = !prefs.big; save(PREFS, prefs); applyPrefs(); });
  hcBtn.addEventListener("click", function () { prefs.hc = !prefs.hc; save(PREFS, prefs); applyPrefs(); });

  function open() {
    root.classList.add("open");
    launch.setAttribute("aria-expanded", "true");
    input.focus();
    prefs.open = true; save(PREFS, prefs);
    if (!started) { started = true; start().catch(function (e) { status("连接失败：" + e.message + "，稍后自动重试。"); retry(); }); }
  }
  function close() {
    root.classList.remove("open");
    launch.setAttribute("aria-expanded", "false");
    prefs.open = false; save(PREFS, prefs);
    launch.focus();
  }
  launch.addEventListener("click", open);
  closeBtn.addEventListener("click", close);
  root.addEventListener("keydown", function (ev) { if (ev.key === "Escape" && root.classList.contains("open")) { ev.preventDefault(); close(); } });
  function status(text) { typing.textContent = text || ""; }
  // What the status line says once a reply has arrived: nothing, or that the resident is still queued.
  function settle() { status(queued && !withAgent ? QUEUED : ""); }

  // ---- rendering ------------------------------------------------------------------------------
  var WHO = { bot: "医保小智", agent: "人工客服", system: "系统消息" };
  function render(m) {
    if (m.seq && shown[m.seq]) return;
    if (m.seq) { shown[m.seq] = true; lastSeq = Math.max(lastSeq, m.seq); }
    var meta = m.meta || {};
    var li = el("li", { class: m.role });
    var b = el("div", { class: "b" });
    b.appendChild(el("span", { class: m.role === "resident" ? "sr" : "who" }, m.role === "resident" ? "我说：" : (WHO[m.role] || "") + "："));
    b.appendChild(document.createTextNode(m.text));
    if (meta.degraded) b.appendChild(el("span", { class: "tag" }, "系统繁忙，此答复直接摘自政策资料库"));
    if (meta.steps && meta.steps.length) {
      var ul = el("ul", { class: "steps", "aria-label": "办理步骤清单" });
      meta.steps.forEach(function (s, i) {
        var id = "xz-s" + m.seq + "-" + i;
        var item = el("li");
        item.append(el("input", { type: "checkbox", id: id }), el("label", { for: id }, (i + 1) + ". " + s));
        ul.appendChild(item);
      });
      b.appendChild(ul);
    }
    (meta.citations || []).forEach(function (c) {
      var cite = el("div", { class: "cite" }, "来源：");
      var src = c.source || {};
      var a = el("a", { href: safeUrl(src.url), target: "_blank", rel: "noopener noreferrer" }, src.title || c.title || "政策原文");
      cite.appendChild(a);
      var when = c.verified === false ? "日期待核实" : (c.effective_date || "");
      cite.appendChild(document.createTextNode("（" + [c.region, when].filter(Boolean).join("，") + "）"));
      b.appendChild(cite);
    });
    var buttons = (meta.buttons || meta.options || []).filter(function (o) { return o && (o.title || typeof o === "string"); });
    if (buttons.length && m.role === "bot") {
      var opts = el("div", { class: "opts", role: "group", "aria-label": "您可以选择" });
      buttons.forEach(function (o) {
        var t = o.title || o;
        var payload = o.payload || t;
        opts.appendChild(el("button", { type: "button", onclick: function () {
          if (payload === "/request_human" || t === "转人工") escalate(); else say(t);
        } }, t));
      });
      b.appendChild(opts);
    }
    li.appendChild(b);
    log.appendChild(li);
    log.scrollTop = log.scrollHeight;
  }
  function safeUrl(u) { return /^https?:\/\//i.test(u || "") ? u : "#"; }

  // ---- talking to the hub ---------------------------------------------------------------------
  function api(path, opts) {
    opts = opts || {};
    var headers = { "Content-Type": "application/json" };
    if (session) headers.Authorization = "Bearer " + session.token;
    return fetch(SERVER + path, { method: opts.method || "GET", headers: headers, body: opts.body ? JSON.stringify(opts.body) : undefined, mode: "cors", credentials: "omit" })
      .then(function (res) {
        return res.json().catch(function () { return {}; }).then(function (body) {
          if (!res.ok) { var e = new Error(body.message || "请求失败（" + res.status + "）"); e.status = res.status; e.code = body.error; throw e; }
          return body;
        });
      });
  }
  function base() { return "/api/sessions/" + encodeURIComponent(session.session_id); }

  var starting = null; // one start at a time: a retry must not open a second conversation
  function start() {
    if (starting) return starting;
    var p = starting = startNow();
    var done = function () { if (starting === p) starting = null; };
    p.then(done, done);
    return p;
  }
  function startNow() {
    var resume = session ? api(base() + "/messages").then(function (t) {
      if (session.greeting) render({ seq: 0, role: "bot", text: session.greeting });
      t.messages.forEach(render);
      withAgent = t.status === "with_agent";
      queued = t.status === "escalated";
      if (queued) settle();
      if (t.status === "closed") { setEnded(true); return checkSurvey(true); }
    }, function (e) { if (e.status === 401 || e.status === 403 || e.status === 404) { session = null; } else throw e; }) : Promise.resolve();
    return resume.then(function () {
      if (session) return;
      var body = { visitor: visitor() };
      if (REGION) body.region = REGION;
      return api("/api/sessions", { method: "POST", body: body }).then(function (s) {
        session = { session_id: s.session_id, token: s.token, greeting: s.greeting };
        save(KEY, session);
        render({ seq: 0, role: "bot", text: s.greeting });
      });
    }).then(function () { connect(); flushPending(); });
  }

  // A fresh conversation: nothing of the old one (messages, sequence numbers, survey, socket) is kept.
  function reset() {
    var old = socket;
    socket = null;
    if (old) { old.onclose = old.onmessage = null; try { old.close(); } catch (e) { /* already closed */ } }
    if (retryTimer) { clearTimeout(retryTimer); retryTimer = null; }
    session = null; starting = null;
    try { localStorage.removeItem(KEY); } catch (e) { /* private mode */ }
    shown = {}; lastSeq = 0; surveyShown = false; withAgent = false; queued = false; lastSent = null;
    log.textContent = "";
    setEnded(false);
    status("");
  }
  function startOver(note) {
    reset();
    started = true;
    return start().then(function () { if (note) status(note); }, function (e) { status("连接失败：" + e.message + "，稍后自动重试。"); retry(); });
  }
  function setEnded(flag) {
    ended = flag;
    endBtn.hidden = flag; newBtn.hidden = !flag; confirmBar.hidden = true;
    humanBtn.hidden = videoBtn.hidden = flag; // a closed conversation can only be followed by a new one
  }
  function flushPending() {
    if (!pending || !session || ended) return;
    var t = pending; pending = null;
    if (input.value.trim() === t) input.value = "";
    say(t);
  }

  function retry() {
    if (retryTimer) return;
    retryTimer = setTimeout(function () {
      retryTimer = null;
      if (!session) { start().catch(function () { retry(); }); } else connect();
    }, backoff);
    backoff = Math.min(backoff * 2, 30000);
  }

  function connect() {
    if (socket || !session) return;
    var url = SERVER.replace(/^http/, "ws") + base() + "/ws?token=" + encodeURIComponent(session.token);
    var ws;
    try { ws = new WebSocket(url); } catch (e) { retry(); return; }
    socket = ws;
    ws.onopen = function () {
      backoff = 1000;
      // catch up on what arrived while disconnected
      api(base() + "/messages?after=" + lastSeq).then(function (t) { t.messages.forEach(render); }, function () {});
    };
    ws.onmessage = function (ev) {
      var e; try { e = JSON.parse(ev.data); } catch (x) { return; }
      if (e.type === "message") { render(e.message); if (e.message.role !== "resident") settle(); }
      else if (e.type === "typing") { if (!withAgent) status("医保小智正在输入…"); }
      else if (e.type === "escalated") { queued = e.status !== "callback"; if (queued) status(QUEUED); }
      else if (e.type === "agent_joined") { withAgent = true; queued = false; status("人工客服已接入，请直接提问。"); }
      else if (e.type === "agent_left") { withAgent = false; queued = false; status("人工客服已离开，医保小智继续为您服务。"); }
      else if (e.type === "closed") { withAgent = false; queued = false; setEnded(true); status("本次对话已结束。如需继续咨询，请点“开始新的对话”。"); checkSurvey(true); }
      else if (e.type === "survey") showSurvey(e.survey);
      else if (e.type === "error" && e.error === "conversation_closed") { var again = lastSent; lastSent = null; restartWith(again); }
      else if (e.type === "error") status(e.message);
    };
    ws.onclose = function (ev) {
      if (socket === ws) socket = null;
      if (ev.code === 4401 || ev.code === 4403) {
        // the hub no longer accepts this conversation's token: start a new one, nothing of the old kept
        reset();
        status("之前的对话已失效，正在为您开始新的对话…");
      }
      retry();
    };
  }

  function say(text) {
    text = (text || "").trim();
    if (!text) return;
    if (ended) { restartWith(text); return; }
    if (!session) { waitFor(text); return; }
    status(withAgent ? "" : "医保小智正在输入…");
    if (socket && socket.readyState === 1) { lastSent = text; socket.send(JSON.stringify({ text: text })); return; }
    api(base() + "/messages", { method: "POST", body: { text: text } }).then(function (r) {
      render(r.message); r.replies.forEach(render); settle();
    }, function (e) {
      if (e.code === "conversation_closed") restartWith(text);
      else { status(e.message + "（已断开，正在重连）"); retry(); }
    });
  }
  // No conversation yet (still connecting, or reconnecting): keep the question and send it once connected.
  function waitFor(text) {
    pending = text;
    status("正在恢复连接，连上后会自动发送您的问题，请稍候。");
    if (!started) { started = true; start().catch(function () { retry(); }); } else if (!starting && !retryTimer) retry();
  }
  // The conversation has ended (here or elsewhere): a new one, and the question goes there.
  function restartWith(text) {
    startOver("上一个对话已经结束，已为您开始新的对话。").then(function () { if (text) say(text); });
  }
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var t = input.value.trim();
    if (!t) return;
    if (!session) { waitFor(t); return; } // the typed question stays in the box until it is sent
    input.value = "";
    say(t);
  });
  input.addEventListener("keydown", function (ev) { if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); form.requestSubmit(); } });

  function escalate() {
    if (!session) return;
    status("正在为您转接人工客服…");
    api(base() + "/escalate", { method: "POST", body: { elderly: !!prefs.big } }).then(function (r) {
      queued = r.status !== "callback";
      status(queued ? QUEUED : "现在不在人工服务时间，已为您登记，工作人员上班后会尽快联系您。");
    }, function (e) { if (e.status === 404 || e.status === 405) say("转人工"); else status(e.message); });
  }
  humanBtn.addEventListener("click", escalate);
  videoBtn.addEventListener("click", function () {
    if (!session) return;
    window.open(SERVER + "/video#session_id=" + encodeURIComponent(session.session_id) + "&token=" + encodeURIComponent(session.token), "_blank", "noopener");
  });
  endBtn.addEventListener("click", function () {
    if (!session) return;
    confirmBar.hidden = false;
    confirmNo.focus();
  });
  confirmNo.addEventListener("click", function () { confirmBar.hidden = true; endBtn.focus(); });
  confirmYes.addEventListener("click", function () {
    confirmBar.hidden = true;
    if (!session) return;
    api(base() + "/close", { method: "POST", body: {} }).then(function () {
      withAgent = false; queued = false; setEnded(true); newBtn.focus();
      status("本次对话已结束，感谢您的咨询。如需继续咨询，请点“开始新的对话”。");
      checkSurvey(true);
    }, function (e) { status(e.message); });
  });
  newBtn.addEventListener("click", function () { startOver().then(function () { input.focus(); }); });

  // ---- follow-up survey (智能回访) -----------------------------------------------------------
  function checkSurvey() {
    if (!session || surveyShown) return Promise.resolve();
    return api(base() + "/survey").then(function (r) { if (r.survey && SURVEY_OPEN.indexOf(r.survey.status) >= 0) showSurvey(r.survey); }, function () {});
  }
  function showSurvey(s) {
    if (surveyShown || !s) return;
    surveyShown = true;
    var li = el("li", { class: "system survey" });
    var b = el("div", { class: "b" });
    var q = el("p", { id: "xz-q", class: "q" }, s.question || "请您为本次服务打分（1分很不满意，5分非常满意）：");
    var rate = el("div", { class: "rate opts", role: "radiogroup", "aria-labelledby": "xz-q" });
    var chosen = 0;
    [1, 2, 3, 4, 5].forEach(function (n) {
      rate.appendChild(el("button", { type: "button", role: "radio", "aria-checked": "false", "aria-pressed": "false", "aria-label": n + "分", onclick: function () {
        chosen = n;
        rate.querySelectorAll("button").forEach(function (x, i) { x.setAttribute("aria-pressed", String(i + 1 === n)); x.setAttribute("aria-checked", String(i + 1 === n)); });
      } }, n + "分"));
    });
    var cl = el("label", { for: "xz-comment", class: "sr" }, "意见或建议（选填）");
    var comment = el("textarea", { id: "xz-comment", maxlength: "500", placeholder: "意见或建议（选填）" });
    var submit = el("button", { type: "button", class: "send" }, "提交评价");
    submit.addEventListener("click", function () {
      if (!chosen) { status("请先选择一个分数。"); return; }
      api(base() + "/survey", { method: "POST", body: { rating: chosen, comment: comment.value.trim() || null } }).then(function () {
        b.textContent = "感谢您的评价！"; status("");
      }, function (e) { status(e.message); });
    });
    b.append(q, rate, cl, comment, submit);
    li.appendChild(b);
    log.appendChild(li);
    log.scrollTop = log.scrollHeight;
  }

  function mount() {
    document.body.appendChild(host);
    // after a reload: resume the same conversation, and reopen the panel if it was open
    if (prefs.open) open();
    else if (session) { started = true; start().catch(function () { retry(); }); }
  }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
  window.__xiaozhiWidget = { open: open, close: close, server: SERVER };
})();
