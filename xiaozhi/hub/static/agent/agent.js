// The agent console: login, live queue (WebSocket), transcript + summary, chat with the resident,
// canned responses, knowledge-base search, transfer / release / close. No framework, no CDN.
(function () {
  "use strict";
  const KEY = "xiaozhi.agent";
  const $ = function (id) { return document.getElementById(id); };
  const CHANNELS = { web: "网页", phone: "电话", video: "视频" };
  const STATUS = { waiting: "等待中", claimed: "处理中", callback: "待回电", closed: "已结束" };
  const ROLES = { resident: "居民", bot: "医保小智", agent: "坐席", system: "系统" };
  const SLOT_LABELS = {
    region: "参保地", insurance_type: "险种", relation: "为谁办理", ev_for: "凭证为谁激活", ev_channel: "激活渠道",
    cr_category: "异地类别", cr_destination: "就医地", reimb_scenario: "报销情形",
  };
  const ROLE_NAMES = { agent: "坐席", supervisor: "班长", admin: "管理员" };

  let auth = null;        // {token, user}
  let config = null;      // /api/agent/config
  let socket = null;
  let items = [];         // the latest queue snapshot
  let receivedAt = 0;     // when it arrived (waiting times tick from there)
  let selected = null;    // queue item id shown in the middle column
  let current = null;     // its detail (item, conversation, summary, messages)
  const shownSeqs = new Set();

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  async function api(path, options) {
    const headers = { "Content-Type": "application/json" };
    if (auth) headers.Authorization = "Bearer " + auth.token;
    const res = await fetch(path, Object.assign({ headers: headers }, options || {}));
    if (res.status === 204) return {};
    const body = await res.json().catch(function () { return {}; });
    if (res.status === 401 && auth) { signOut("登录已失效，请重新登录。"); }
    if (!res.ok) throw Object.assign(new Error(body.message || "操作失败，请稍后再试。"), { status: res.status });
    return body;
  }

  function post(path, body) { return api(path, { method: "POST", body: JSON.stringify(body || {}) }); }

  function say(text, isError) {
    const s = $("action-status");
    s.textContent = text || "";
    s.className = "status" + (isError ? " err" : "");
  }

  // -- login / logout ------------------------------------------------------------------------------
  function showLogin(message) {
    $("desk-view").hidden = true;
    $("login-view").hidden = false;
    $("login-error").textContent = message || "";
    $("username").focus();
  }

  function signOut(message) {
    auth = null;
    sessionStorage.removeItem(KEY);
    if (socket) { socket.onclose = null; socket.close(); socket = null; }
    selected = null; current = null; items = [];
    showLogin(message);
  }

  $("login-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    $("login-error").textContent = "";
    try {
      const r = await post("/api/staff/login", { username: $("username").value.trim(), password: $("password").value });
      auth = { token: r.token, user: r.user };
      sessionStorage.setItem(KEY, JSON.stringify(auth));
      $("password").value = "";
      await enterDesk();
    } catch (e) { $("login-error").textContent = e.message; }
  });

  $("logout").addEventListener("click", async function () {
    try { await post("/api/staff/logout"); } catch (e) { /* already gone */ }
    signOut("您已退出登录。");
  });

  async function enterDesk() {
    config = await api("/api/agent/config");
    $("login-view").hidden = true;
    $("desk-view").hidden = false;
    const u = config.user;
    $("me").textContent = (u.display_name || u.username) + "（" + (ROLE_NAMES[u.role] || u.role) + "）";
    $("sla-note").textContent = "等待超过 " + Math.round(config.sla_warning_s) + " 秒标红提醒";
    fillSelect($("disposition"), config.dispositions, "选择处理结果");
    fillSelect($("transfer-topic"), config.topics, "转回队列（不改业务类别）");
    loadCanned();
    connect();
  }

  function fillSelect(select, labels, first) {
    select.textContent = "";
    const none = el("option", "", first); none.value = ""; select.appendChild(none);
    Object.keys(labels).forEach(function (key) {
      const o = el("option", "", labels[key]); o.value = key; select.appendChild(o);
    });
  }

  // -- live queue ----------------------------------------------------------------------------------
  function connect() {
    const proto = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(proto + location.host + "/api/agent/ws?token=" + encodeURIComponent(auth.token));
    socket.onmessage = function (ev) {
      const event = JSON.parse(ev.data);
      if (event.type === "queue") onQueue(event);
      else if (event.type === "message" && current && event.conversation_id === current.item.conversation_id) {
        addMessage(event.message);
      } else if (event.type === "closed" && current && event.conversation_id === current.item.conversation_id) {
        say("居民已结束对话。");
      }
    };
    socket.onclose = function (ev) {
      socket = null;
      if (ev.code === 4401) { signOut("登录已失效，请重新登录。"); return; }
      if (auth) setTimeout(function () { if (auth && !socket) connect(); }, 2000);
    };
  }

  function onQueue(event) {
    items = event.items;
    receivedAt = Date.now();
    const svc = $("service-state");
    svc.textContent = event.in_service ? "服务时间内" : "非服务时间 · 新请求转为回电";
    svc.className = "pill" + (event.in_service ? "" : " off");
    $("online").textContent = "在线坐席：" + (event.online.length ? event.online.join("、") : "无");
    const list = $("online-agents"); list.textContent = "";
    event.online.forEach(function (name) { const o = el("option"); o.value = name; list.appendChild(o); });
    renderQueue();
    if (selected !== null) {
      const mine = items.find(function (i) { return i.id === selected; });
      if (mine && current && (mine.status !== current.item.status || mine.agent !== current.item.agent)) {
        current.item = mine; renderHead();
      }
    }
  }

  function waited(item) {
    const extra = item.status === "claimed" || item.status === "closed" ? 0 : (Date.now() - receivedAt) / 1000;
    return item.waiting_s + extra;
  }

  function clock(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const m = Math.floor(s / 60);
    return (m >= 60 ? Math.floor(m / 60) + ":" + String(m % 60).padStart(2, "0") : String(m)) + ":" + String(s % 60).padStart(2, "0");
  }

  function renderQueue() {
    const ol = $("queue");
    ol.textContent = "";
    // not named "open": that would hide open(id) below, and clicking an item threw (issue 19)
    const shown = items.filter(function (i) { return i.status !== "closed"; });
    $("queue-count").textContent = String(shown.filter(function (i) { return i.status !== "claimed"; }).length);
    $("queue-empty").hidden = shown.length > 0;
    shown.forEach(function (item) {
      const sla = item.status === "waiting" && waited(item) >= config.sla_warning_s;
      const li = el("li", (item.id === selected ? "selected " : "") + (sla ? "sla" : ""));
      li.dataset.id = item.id;
      li.dataset.status = item.status;
      const row = el("div", "row");
      row.appendChild(el("span", "topic", item.topic_label));
      row.appendChild(el("span", "tag", CHANNELS[item.channel] || item.channel));
      row.appendChild(el("span", "tag", item.reason_label));
      if (item.elderly) row.appendChild(el("span", "tag elderly", "长者"));
      if (sla) row.appendChild(el("span", "tag warn sla-flag", "超时"));
      const wait = el("span", "wait", clock(waited(item)));
      wait.title = item.status === "claimed" ? "接入前等待时长" : "已等待";
      row.appendChild(wait);
      li.appendChild(row);
      if (item.last_question) li.appendChild(el("div", "q", "“" + item.last_question + "”"));
      const foot = el("div", "row");
      const state = item.status === "claimed"
        ? (item.agent === auth.user.username ? "我正在处理" : "处理人：" + item.agent)
        : STATUS[item.status];
      foot.appendChild(el("span", "tag" + (item.agent === auth.user.username ? " mine" : ""), state));
      if (item.status === "waiting" || item.status === "callback") {
        const b = el("button", "claim", item.status === "callback" ? "接单回电" : "接入");
        b.type = "button";
        b.addEventListener("click", function (ev) { ev.stopPropagation(); claim(item.id); });
        foot.appendChild(b);
      }
      if (item.call_url) {
        const a = el("a", "call", "打开视频/通话");
        a.href = item.call_url; a.target = "_blank"; a.rel = "noopener";
        a.addEventListener("click", function (ev) { ev.stopPropagation(); });
        foot.appendChild(a);
      }
      li.appendChild(foot);
      li.addEventListener("click", function () { openItem(item.id); });
      ol.appendChild(li);
    });
  }

  setInterval(function () { if (auth && items.length) renderQueue(); }, 1000);

  // -- one conversation ----------------------------------------------------------------------------
  async function openItem(id) {
    try {
      const detail = await api("/api/agent/queue/" + id);
      show(detail);
    } catch (e) { say(e.message, true); }
  }

  async function claim(id) {
    try {
      const detail = await post("/api/agent/queue/" + id + "/claim");
      show(detail);
      say("已接入，居民会看到您的回复。");
      $("reply").focus();
    } catch (e) { say(e.message, true); }
  }

  function show(detail) {
    selected = detail.item.id;
    current = detail;
    $("conv-empty").hidden = true;
    $("conv").hidden = false;
    renderHead();
    renderSummary(detail.summary, detail.conversation);
    const t = $("transcript");
    t.textContent = "";
    shownSeqs.clear();
    detail.messages.forEach(addMessage);
    renderQueue();
  }

  function holding() {
    return current && current.item.status === "claimed" && current.item.agent === auth.user.username;
  }

  function renderHead() {
    const item = current.item;
    $("conv-title").textContent = item.topic_label + " · " + (CHANNELS[item.channel] || item.channel) + "咨询 #" + item.id;
    $("conv-state").textContent = item.status === "claimed"
      ? (item.agent === auth.user.username ? "我正在处理" : "处理人：" + item.agent) : STATUS[item.status];
    const link = $("call-link");
    link.hidden = !item.call_url;
    if (item.call_url) { link.href = item.call_url; link.target = "_blank"; link.rel = "noopener"; }
    $("claim-btn").hidden = !(item.status === "waiting" || item.status === "callback");
    const mine = holding();
    const supervisor = config.user.role !== "agent";
    $("reply").disabled = !mine; $("send").disabled = !mine;
    $("reply").placeholder = mine ? "输入回复，Ctrl+Enter 发送" : "接入后才能回复居民";
    $("release-btn").disabled = !mine;
    $("transfer-btn").disabled = !(mine || (supervisor && item.status !== "closed"));
    $("close-btn").disabled = !(mine || (supervisor && item.status !== "closed"));
  }

  function row(dl, label, value) {
    dl.appendChild(el("dt", "", label));
    const dd = el("dd");
    if (typeof value === "string") dd.textContent = value; else dd.appendChild(value);
    dl.appendChild(dd);
  }

  function renderSummary(summary, conversation) {
    const dl = $("summary");
    dl.textContent = "";
    row(dl, "意图", summary.intents && summary.intents.length ? summary.intents.join("、") : "未识别");
    const slots = Object.keys(summary.slots || {}).map(function (k) { return (SLOT_LABELS[k] || k) + "：" + summary.slots[k]; });
    row(dl, "已知信息", slots.length ? slots.join("；") : "无");
    const cites = el("span");
    (summary.citations || []).forEach(function (c, i) {
      if (i) cites.appendChild(document.createTextNode("；"));
      cites.appendChild(el("span", "", c.title + "（" + c.region + "）"));
    });
    row(dl, "引用条目", summary.citations && summary.citations.length ? cites : "无");
    row(dl, "未答上", String(summary.failed_turns || 0) + " 次" + (summary.degraded ? "（期间智能对话繁忙）" : ""));
    const who = [];
    if (summary.elderly) who.push("长者优先");
    if (conversation.contact) who.push("联系方式：" + conversation.contact);
    if (conversation.entry_point) who.push("来源：" + conversation.entry_point);
    if (who.length) row(dl, "居民", who.join("；"));
    (summary.notes || []).forEach(function (n) { row(dl, "交接备注", n.by + "：" + n.text); });
  }

  function addMessage(m) {
    if (shownSeqs.has(m.seq)) return;
    shownSeqs.add(m.seq);
    const li = el("li", m.role);
    const name = m.role === "agent" && m.meta && m.meta.agent_name ? "坐席 " + m.meta.agent_name : ROLES[m.role] || m.role;
    const time = new Date(m.created_at);
    li.appendChild(el("span", "who", name + " · " + time.toLocaleTimeString("zh-CN", { hour12: false })));
    li.appendChild(el("div", "bubble", m.text));
    const t = $("transcript");
    t.appendChild(li);
    t.scrollTop = t.scrollHeight;
  }

  $("claim-btn").addEventListener("click", function () { if (current) claim(current.item.id); });

  async function send() {
    const text = $("reply").value.trim();
    if (!text || !holding()) return;
    try {
      const r = await post("/api/agent/queue/" + current.item.id + "/messages", { text: text });
      addMessage(r.message);
      $("reply").value = "";
      say("");
    } catch (e) { say(e.message, true); }
  }

  $("composer").addEventListener("submit", function (ev) { ev.preventDefault(); send(); });
  $("reply").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send(); }
  });

  async function act(path, body, done) {
    if (!current) return;
    try {
      const r = await post("/api/agent/queue/" + current.item.id + "/" + path, body);
      current.item = r.item;
      renderHead();
      say(done);
    } catch (e) { say(e.message, true); }
  }

  $("transfer-btn").addEventListener("click", function () {
    const to = $("transfer-agent").value.trim();
    const topic = $("transfer-topic").value;
    const note = $("transfer-note").value.trim();
    const body = { note: note };
    if (to) body.to_agent = to; else body.topic = topic || null;
    if (!to && !topic && !note) { say("请填写转给哪位工作人员，或者转回队列时写明备注。", true); return; }
    act("transfer", body, to ? "已转接给 " + to + "。" : "已转回排队列表。");
    $("transfer-agent").value = ""; $("transfer-note").value = "";
  });

  $("release-btn").addEventListener("click", function () {
    act("release", {}, "已释放，居民回到排队列表，期间由医保小智继续回答。");
  });

  $("close-btn").addEventListener("click", function () {
    const disposition = $("disposition").value;
    if (!disposition) { say("请先选择处理结果。", true); $("disposition").focus(); return; }
    act("close", { disposition: disposition, note: $("close-note").value.trim(), end_conversation: $("end-conv").checked },
      "服务已结束，处理结果：" + config.dispositions[disposition] + "。");
    $("close-note").value = "";
  });

  // -- canned responses and knowledge base -----------------------------------------------------------
  async function loadCanned() {
    try {
      const r = await api("/api/agent/canned");
      const ul = $("canned");
      ul.textContent = "";
      r.responses.forEach(function (c) {
        const li = el("li");
        const b = el("button", "", c.title);
        b.type = "button"; b.title = c.text; b.dataset.id = c.id;
        b.addEventListener("click", function () { insert(c.text); });
        li.appendChild(b);
        ul.appendChild(li);
      });
    } catch (e) { say(e.message, true); }
  }

  function insert(text) {
    const box = $("reply");
    box.value = box.value ? box.value + "\n" + text : text;
    box.focus();
  }

  $("kb-form").addEventListener("submit", async function (ev) {
    ev.preventDefault();
    const q = $("kb-q").value.trim();
    if (!q) return;
    const ol = $("kb-results");
    ol.textContent = "";
    ol.appendChild(el("li", "muted", "正在搜索…"));
    const params = new URLSearchParams({ q: q });
    const region = current && current.conversation.region_code;
    if (region) params.set("region", region);
    try {
      const r = await api("/api/agent/kb/search?" + params.toString());
      ol.textContent = "";
      if (!r.results.length) ol.appendChild(el("li", "muted", "没有找到相关政策。"));
      r.results.forEach(function (hit) {
        const li = el("li");
        li.appendChild(el("div", "title", hit.title));
        li.appendChild(el("p", "", hit.answer));
        const src = el("div", "src", "来源：" + hit.citation.source.title + "（" + hit.citation.region + "，" + hit.citation.effective_date + "）");
        li.appendChild(src);
        const b = el("button", "", "插入回复");
        b.type = "button";
        b.addEventListener("click", function () { insert(hit.answer); });
        li.appendChild(b);
        ol.appendChild(li);
      });
    } catch (e) { ol.textContent = ""; ol.appendChild(el("li", "error", e.message)); }
  });

  // -- start ---------------------------------------------------------------------------------------
  const saved = sessionStorage.getItem(KEY);
  if (saved) {
    try { auth = JSON.parse(saved); } catch (e) { auth = null; }
  }
  if (auth) enterDesk().catch(function () { signOut("请登录。"); });
  else showLogin("");
})();
