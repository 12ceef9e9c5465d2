// 知识库维护: list and filter the knowledge records, edit with inline validation, the review flow,
// version history with restore, spreadsheet import/export and publishing (admins). API: /api/staff/kb/...
(function () {
  "use strict";
  var TOKEN_KEY = "xz_staff_token";
  var $ = function (id) { return document.getElementById(id); };
  var ROLE = { agent: "坐席", supervisor: "主管", admin: "管理员" };
  var RANK = { agent: 1, supervisor: 2, admin: 3 };
  var TOPICS = { e_voucher: "医保电子凭证", cross_region: "异地就医", reimbursement: "医疗费用报销", enrollment: "参保缴费",
    personal_account: "个人账户", chronic_disease: "门诊慢特病", maternity: "生育保险", card: "社保卡", referral: "转诊转院",
    drug_catalog: "药品目录", payment_reform: "支付方式改革", designated_institutions: "定点医药机构", service_info: "经办服务", other: "其他" };
  var ACTIONS = { create: "新建", edit: "修改", restore: "恢复", import: "导入", state: "状态变更" };
  var me = null, current = null, offset = 0, checkTimer = null, creating = false;
  var token = function () { return sessionStorage.getItem(TOKEN_KEY); };

  function api(path, opts) {
    opts = opts || {};
    var headers = {};
    if (!opts.rawBody) headers["Content-Type"] = "application/json";
    if (token()) headers.Authorization = "Bearer " + token();
    var body = opts.rawBody || (opts.body ? JSON.stringify(opts.body) : undefined);
    return fetch(path, { method: opts.method || "GET", headers: headers, body: body }).then(function (res) {
      if (opts.blob && res.ok) return res.blob();
      return res.json().catch(function () { return {}; }).then(function (b) {
        if (!res.ok) { var e = new Error(b.message || "请求失败"); e.status = res.status; e.body = b; throw e; }
        return b;
      });
    });
  }
  function fail(e) {
    if (e.status === 401) { sessionStorage.removeItem(TOKEN_KEY); show("login"); return; }
    $("status").textContent = e.message;
  }
  function show(which) { $("login").hidden = which !== "login"; $("dash").hidden = which !== "dash"; $("logout").hidden = which !== "dash"; }
  function el(tag, text, cls) { var n = document.createElement(tag); if (text != null) n.textContent = text; if (cls) n.className = cls; return n; }
  function today() { var d = new Date(); d.setMinutes(d.getMinutes() - d.getTimezoneOffset()); return d.toISOString().slice(0, 10); }
  function lines(v) { return (v || "").split("\n").map(function (s) { return s.trim(); }).filter(Boolean); }
  function can(role) { return me && RANK[me.role] >= RANK[role]; }

  function query() {
    var p = new URLSearchParams();
    [["kind", "f-kind"], ["topic", "f-topic"], ["region", "f-region"], ["state", "f-state"], ["older_than", "f-age"], ["expiring", "f-expiring"], ["q", "f-q"]]
      .forEach(function (pair) { var v = $(pair[1]).value.trim(); if (v) p.set(pair[0], v); });
    var uses = $("f-uses").value;
    if (uses === "unused") p.set("max_uses", "0"); else if (uses) p.set("min_uses", uses);
    if ($("f-sort").value === "uses") p.set("sort", "uses");
    return p;
  }

  function load(more) {
    offset = more ? offset + 50 : 0;
    var p = query(); p.set("limit", "50"); p.set("offset", String(offset));
    $("status").textContent = "加载中…";
    return api("/api/staff/kb/records?" + p).then(function (r) {
      var body = $("list").tBodies[0];
      if (!more) body.textContent = "";
      r.records.forEach(function (rec) {
        var tr = el("tr"); tr.dataset.kind = rec.kind; tr.dataset.id = rec.id; tr.tabIndex = 0;
        tr.appendChild(el("td", rec.id, "mono"));
        tr.appendChild(el("td", rec.doc.question || rec.doc.title));
        tr.appendChild(el("td", rec.state_label + (rec.pending && rec.state !== "published" ? "（线上为旧版）" : ""), "st st-" + rec.state));
        tr.appendChild(el("td", rec.source_date || "—"));
        tr.appendChild(el("td", rec.expiry_date ? rec.expiry_date + (rec.expiry_date < today() ? "（已过期）" : "") : "—",
          rec.expiry_date && rec.expiry_date < today() ? "expired" : null));
        tr.appendChild(el("td", String(rec.uses == null ? "—" : rec.uses), "num"));
        tr.appendChild(el("td", "v" + rec.version));
        tr.addEventListener("click", function () { open(rec.kind, rec.id); });
        tr.addEventListener("keydown", function (ev) { if (ev.key === "Enter") open(rec.kind, rec.id); });
        body.appendChild(tr);
      });
      $("total").textContent = "（共" + r.total + "条）";
      $("more").hidden = offset + 50 >= r.total;
      $("status").textContent = "";
    }, fail);
  }

  function setKind(kind) {
    document.querySelectorAll("#editor [data-kind]").forEach(function (n) { n.hidden = n.dataset.kind !== kind; });
  }

  function fill(rec) {
    var d = rec.doc, s = d.source || {}, r = d.region || {};
    current = rec; setKind(rec.kind); creating = !!rec.creating;
    $("e-id").readOnly = !creating;
    $("editor").hidden = false;
    $("editor-title").textContent = (rec.kind === "point" ? "知识点 " : "条目 ") + rec.id;
    $("e-meta").textContent = "状态：" + rec.state_label + " · 第" + rec.version + "版" +
      (rec.published_version ? " · 线上为第" + rec.published_version + "版" : " · 未在线上") + " · 最后修改：" + (rec.updated_by || "—");
    $("e-id").value = d.id; $("e-entry").value = d.entry || "";
    $("e-title").value = d.title || ""; $("e-topic").value = d.topic || "";
    $("e-question").value = d.question || "";
    $("e-asks").value = (rec.kind === "point" ? d.asks : d.questions || []).join("\n");
    $("e-answer").value = d.answer || ""; $("e-spoken").value = d.spoken || "";
    $("e-steps").value = (d.steps || []).join("\n");
    $("e-src-title").value = s.title || ""; $("e-src-url").value = s.url || ""; $("e-src-publisher").value = s.publisher || "";
    $("e-src-document").value = s.document || ""; $("e-src-date").value = s.date || "";
    $("e-effective").value = d.effective_date || ""; $("e-expiry").value = d.expiry_date || "";
    $("e-region-code").value = r.code || ""; $("e-region-name").value = r.name || ""; $("e-region-level").value = r.level || "national";
    $("e-region-parent").value = r.parent || ""; $("e-review").value = d.review || ""; $("e-reason").value = "";
    showProblems(rec.problems || []);
    preview();
    var editable = can("supervisor");
    document.querySelectorAll("#edit-form input, #edit-form textarea, #edit-form select").forEach(function (n) {
      if (n.id !== "e-id" && n.id !== "e-entry") n.disabled = !editable;
    });
    document.querySelectorAll("#edit-form .actions button").forEach(function (b) {
      var target = b.dataset.state;
      var needs = target === "published" || target === "retired" ? "admin" : "supervisor";
      b.hidden = !can(needs) || (target && (creating || !allowed(rec.state, target))) || (b.id === "new-point" && creating);
    });
    if (creating) {
      $("e-meta").textContent = rec.kind === "point" ? "新建知识点（所属条目 " + d.entry + "），保存后为草稿" : "新建条目，保存后为草稿";
      $("editor-title").textContent = rec.kind === "point" ? "新建知识点" : "新建条目";
    }
    history(rec.history || []);
    if (!creating) answered(rec);
  }

  function answered(rec) {
    $("answered").hidden = true;
    if (!can("supervisor")) return;
    api("/api/staff/kb/records/" + rec.kind + "/" + encodeURIComponent(rec.id) + "/answered").then(function (r) {
      var ul = $("answered-list"); ul.textContent = "";
      r.conversations.forEach(function (c) {
        ul.appendChild(el("li", new Date(c.at).toLocaleString("zh-CN") + " · " + ({ web: "网页", phone: "电话", video: "视频" }[c.channel] || c.channel) +
          (c.contact ? " · " + c.contact : "") + " · 会话 " + c.conversation.slice(0, 8) + "：" + c.reply));
      });
      $("answered").hidden = !r.conversations.length;
    }, function () {});
  }

  function allowed(from, to) {
    return { draft: ["in_review", "published"], in_review: ["draft", "published"], published: ["retired"], retired: ["draft"] }[from].indexOf(to) >= 0;
  }

  function doc() {
    var d = JSON.parse(JSON.stringify(current.doc));
    if (creating) d.id = $("e-id").value.trim();
    var src = { title: $("e-src-title").value.trim(), url: $("e-src-url").value.trim(),
      publisher: $("e-src-publisher").value.trim() || null, document: $("e-src-document").value.trim() || null,
      date: $("e-src-date").value || null };
    d.source = src;
    d.answer = $("e-answer").value.trim(); d.spoken = $("e-spoken").value.trim();
    d.review = $("e-review").value.trim() || null;
    if ($("e-expiry").value) d.expiry_date = $("e-expiry").value; else delete d.expiry_date;
    d.region = { level: $("e-region-level").value, code: $("e-region-code").value.trim(), name: $("e-region-name").value.trim(),
      parent: $("e-region-parent").value.trim() || null };
    if (current.kind === "point") { d.question = $("e-question").value.trim(); d.asks = lines($("e-asks").value); }
    else {
      d.title = $("e-title").value.trim(); d.topic = $("e-topic").value; d.questions = lines($("e-asks").value);
      d.steps = lines($("e-steps").value); d.effective_date = $("e-effective").value;
    }
    return d;
  }

  function showProblems(problems) {
    var ul = $("problems"); ul.textContent = "";
    var refused = problems.filter(function (p) { return p.severity !== "warning"; });
    if (!refused.length) ul.appendChild(el("li", problems.length ? "校验通过（有提醒）" : "校验通过", "ok"));
    problems.forEach(function (p) { ul.appendChild(el("li", p.message, p.severity === "warning" ? "warn" : "bad")); });
  }

  function preview() {
    var d = doc(), chat = $("pv-chat"); chat.textContent = "";
    chat.appendChild(el("p", d.answer));
    (d.steps || []).forEach(function (s, i) { chat.appendChild(el("p", (i + 1) + ". " + s, "step")); });
    var s = d.source || {};
    chat.appendChild(el("p", "来源：" + (s.title || "—") + (s.document ? "（" + s.document + "）" : "") + (s.date ? " · " + s.date : "") +
      " · " + (d.region && d.region.name || "全国") + (d.review ? " · 日期待核实" : ""), "src"));
    $("pv-phone").textContent = d.spoken;
  }

  function check() {
    if (!current || !can("supervisor")) return;
    clearTimeout(checkTimer);
    checkTimer = setTimeout(function () {
      api("/api/staff/kb/check/" + current.kind, { method: "POST", body: { doc: doc() } })
        .then(function (r) { showProblems(r.problems); }, fail);
    }, 300);
  }

  function history(rows) {
    var body = $("history").tBodies[0]; body.textContent = "";
    rows.forEach(function (v) {
      var tr = el("tr");
      tr.appendChild(el("td", "v" + v.version));
      tr.appendChild(el("td", new Date(v.at).toLocaleString("zh-CN")));
      tr.appendChild(el("td", v.actor));
      tr.appendChild(el("td", (ACTIONS[v.action] || v.action) + " → " + v.state_label));
      var diff = el("td", null, "diff");
      (v.diff || []).slice(0, 6).forEach(function (c) {
        var p = el("div"); p.appendChild(el("b", c.field + "：")); p.appendChild(el("del", String(c.before == null ? "" : c.before).slice(0, 80)));
        p.appendChild(el("ins", String(c.after == null ? "" : c.after).slice(0, 80))); diff.appendChild(p);
      });
      tr.appendChild(diff);
      tr.appendChild(el("td", v.reason));
      var td = el("td");
      if (can("supervisor") && v.version !== current.version) {
        var b = el("button", "恢复此版"); b.type = "button";
        b.addEventListener("click", function () { restore(v.version); });
        td.appendChild(b);
      }
      tr.appendChild(td); body.appendChild(tr);
    });
  }

  function open(kind, id) {
    return api("/api/staff/kb/records/" + kind + "/" + encodeURIComponent(id)).then(fill, fail);
  }
  function reopen(msg) { return open(current.kind, current.id).then(function () { $("e-status").textContent = msg; load(); }); }

  function blankPoint(entry, question) {
    // A new point under ``entry``, with the entry's region and source as a start (the curator corrects them).
    return api("/api/staff/kb/records/entry/" + encodeURIComponent(entry)).then(function (parent) {
      var p = parent.doc;
      fill({ kind: "point", id: "", creating: true, state: "draft", version: 0, history: [], problems: [],
        doc: { id: "", entry: p.id, question: question || "", asks: [], answer: "", spoken: "", facts: [], when: {},
          source: JSON.parse(JSON.stringify(p.source)), review: null, local_figure: false, region: p.region } });
      $("e-id").value = p.id + ".";
      $("e-id").focus();
    }, fail);
  }

  function blankEntry() {
    // A new entry: the topic the list is filtered on, national until the curator says otherwise.
    fill({ kind: "entry", id: "", creating: true, state: "draft", version: 0, history: [], problems: [],
      doc: { id: "", topic: $("f-topic").value || "other", title: "", questions: [], spoken: "", answer: "", steps: [],
        source: { title: "", url: "", publisher: null, document: null, date: null }, effective_date: "", tags: [],
        local_figure: false, overrides: null, review: null, region: { level: "national", code: "100000", name: "全国", parent: null } } });
    $("e-id").focus();
  }

  function save(ev) {
    ev.preventDefault();
    $("e-status").textContent = "保存中…";
    if (creating) {
      var fresh = doc(); fresh.id = $("e-id").value.trim();
      api("/api/staff/kb/records/" + current.kind, { method: "POST", body: { doc: fresh, reason: $("e-reason").value.trim() } })
        .then(function (rec) { current = rec; creating = false; return reopen("已保存为草稿"); }, function (e) {
          creating = true;
          if (e.body && e.body.problems) showProblems(e.body.problems);
          $("e-status").textContent = e.message;
        });
      return;
    }
    api("/api/staff/kb/records/" + current.kind + "/" + encodeURIComponent(current.id),
        { method: "PUT", body: { doc: doc(), reason: $("e-reason").value.trim() } })
      .then(function () { return reopen("已保存为草稿"); }, function (e) {
        if (e.body && e.body.problems) showProblems(e.body.problems);
        $("e-status").textContent = e.message;
      });
  }
  function move(state) {
    api("/api/staff/kb/records/" + current.kind + "/" + encodeURIComponent(current.id) + "/state",
        { method: "POST", body: { state: state, reason: $("e-reason").value.trim() } })
      .then(function () { return reopen(state === "published" ? "已审核通过；点“发布到线上”后居民即可看到" : "状态已更新"); },
            function (e) { $("e-status").textContent = e.message; });
  }
  function restore(version) {
    api("/api/staff/kb/records/" + current.kind + "/" + encodeURIComponent(current.id) + "/restore",
        { method: "POST", body: { version: version, reason: $("e-reason").value.trim() } })
      .then(function () { return reopen("已恢复为第" + version + "版的内容（草稿）"); }, function (e) { $("e-status").textContent = e.message; });
  }
  function publish() {
    $("status").textContent = "正在发布（重建索引）…";
    api("/api/staff/kb/publish", { method: "POST", body: {} }).then(function (r) {
      $("status").textContent = "已发布第" + r.generation + "版知识库：" + r.entries + "个条目、" + r.points + "个知识点，用时" + r.seconds + "秒";
    }, fail);
  }
  function download(kind) {
    var path = kind === "template" ? "/api/staff/kb/template.xlsx" : "/api/staff/kb/export." + kind + "?" + query();
    api(path, { blob: true }).then(function (blob) {
      var a = document.createElement("a"); a.href = URL.createObjectURL(blob);
      a.download = kind === "template" ? "知识点导入模板.xlsx" : "知识点." + kind; a.click();
      setTimeout(function () { URL.revokeObjectURL(a.href); }, 1000);
    }, fail);
  }
  function importFile() {
    var file = $("import-file").files[0]; if (!file) return;
    var report = $("import-report"); report.hidden = false; report.textContent = "正在检查 " + file.name + " …";
    file.arrayBuffer().then(function (buf) {
      return api("/api/staff/kb/import?filename=" + encodeURIComponent(file.name), { method: "POST", rawBody: buf });
    }).then(function (r) {
      report.textContent = "导入完成：共" + r.rows + "行，新建" + r.created + "条，修改" + r.changed + "条（均为草稿，审核发布后生效）。";
      load();
    }, function (e) {
      report.textContent = ""; report.appendChild(el("p", e.message, "error"));
      var ul = el("ul");
      ((e.body && e.body.bad) || []).slice(0, 200).forEach(function (b) {
        ul.appendChild(el("li", "第" + b.line + "行" + (b.id ? "（" + b.id + "）" : "") + "：" + b.reasons.join("；")));
      });
      report.appendChild(ul);
    }).then(function () { $("import-file").value = ""; });
  }

  function reminders() {
    return api("/api/staff/kb/reminders?older_than=5").then(function (r) {
      var box = $("reminders"); box.textContent = "";
      var clear = function () { ["f-age", "f-state", "f-expiring", "f-uses"].forEach(function (id) { $(id).value = ""; }); };
      var days = String(r.expiring_within_days);
      if (!$("f-expiring").querySelector('option[value="' + days + '"]')) {
        var o = el("option", "已过期或" + days + "天内到期"); o.value = days; $("f-expiring").appendChild(o);
      }
      [["source_old", "来源超过" + r.older_than_years + "年或未注明日期", function () { clear(); $("f-age").value = "5"; }],
       ["expiring", "已过期或" + days + "天内到期" + (r.expiring.expired ? "（已过期" + r.expiring.expired + "条，已不再答复居民）" : ""),
        function () { clear(); $("f-expiring").value = days; }],
       ["in_review", "待审核", function () { clear(); $("f-state").value = "in_review"; }],
       ["unverified", "线上仍标注“待核实”", null]].forEach(function (item) {
        var n = r[item[0]].count; if (!n) return;
        var b = el("button", item[1] + "：" + n + "条", "reminder"); b.type = "button";
        if (item[2]) b.addEventListener("click", function () { item[2](); $("f-kind").value = ""; load(); });
        else b.disabled = true;
        box.appendChild(b);
      });
    }, fail);
  }

  function start() {
    api("/api/staff/me").then(function (user) {
      me = user; show("dash");
      $("who").textContent = (user.display_name || user.username) + "（" + (ROLE[user.role] || user.role) + "）";
      $("publish").hidden = !can("admin");
      $("import-file").parentNode.hidden = !can("supervisor");
      load(); reminders();
      var params = new URLSearchParams(location.search);  // a link from elsewhere: ?new=point&entry=…&question=…
      if (params.get("new") === "point" && params.get("entry") && can("supervisor")) blankPoint(params.get("entry"), params.get("question"));
      else if (params.get("new") === "entry" && can("supervisor")) blankEntry();
      $("new-entry").hidden = !can("supervisor");
    }, fail);
  }

  Object.keys(TOPICS).forEach(function (k) {
    var a = el("option", TOPICS[k]); a.value = k; $("f-topic").appendChild(a);
    var b = el("option", TOPICS[k]); b.value = k; $("e-topic").appendChild(b);
  });
  $("filters").addEventListener("submit", function (ev) { ev.preventDefault(); load(); });
  $("more").addEventListener("click", function () { load(true); });
  $("edit-form").addEventListener("submit", save);
  $("edit-form").addEventListener("input", function () { preview(); check(); });
  document.querySelectorAll("#edit-form [data-state]").forEach(function (b) {
    b.addEventListener("click", function () { move(b.dataset.state); });
  });
  $("publish").addEventListener("click", publish);
  $("new-entry").addEventListener("click", blankEntry);
  $("new-point").addEventListener("click", function () { blankPoint(current.kind === "entry" ? current.id : current.doc.entry); });
  $("export-csv").addEventListener("click", function () { download("csv"); });
  $("export-xlsx").addEventListener("click", function () { download("xlsx"); });
  $("template").addEventListener("click", function () { download("template"); });
  $("import-file").addEventListener("change", importFile);
  $("login-form").addEventListener("submit", function (ev) {
    ev.preventDefault(); $("login-error").textContent = "";
    api("/api/staff/login", { method: "POST", body: { username: $("username").value, password: $("password").value } })
      .then(function (r) { sessionStorage.setItem(TOKEN_KEY, r.token); start(); }, function (e) { $("login-error").textContent = e.message; });
  });
  $("logout").addEventListener("click", function () {
    api("/api/staff/logout", { method: "POST" }).catch(function () {}).then(function () { sessionStorage.removeItem(TOKEN_KEY); me = null; show("login"); });
  });
  if (token()) start(); else show("login");
})();
