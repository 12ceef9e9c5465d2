// 精准分析 dashboard: staff login (shared with the agent console), filters, inline SVG charts, CSV export.
(function () {
  "use strict";
  var TOKEN_KEY = "xz_staff_token";
  var $ = function (id) { return document.getElementById(id); };
  var SVG = "http://www.w3.org/2000/svg";
  var COLORS = { web: "#1f77b4", phone: "#ff7f0e", video: "#2ca02c" };
  var CHANNEL = { web: "网页", phone: "电话", video: "视频" };
  var OUTCOME = { answered: "已解答", clarifying: "追问澄清", abstained: "未能回答", escalated: "转人工", degraded: "简化模式" };
  var ROLE = { agent: "坐席", supervisor: "主管", admin: "管理员" };
  var RANK = { agent: 1, supervisor: 2, admin: 3 };
  var token = function () { return sessionStorage.getItem(TOKEN_KEY); };
  var me = null;

  function api(path, opts) {
    opts = opts || {};
    var headers = { "Content-Type": "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    return fetch(path, { method: opts.method || "GET", headers: headers, body: opts.body ? JSON.stringify(opts.body) : undefined })
      .then(function (res) {
        if (opts.raw && res.ok) return res;
        return res.json().catch(function () { return {}; }).then(function (b) {
          if (!res.ok) { var e = new Error(b.message || "请求失败"); e.status = res.status; throw e; }
          return b;
        });
      });
  }
  function show(which) { $("login").hidden = which !== "login"; $("dash").hidden = which !== "dash"; $("logout").hidden = which !== "dash"; }
  function el(tag, attrs, text) {
    var n = document.createElement(tag);
    for (var k in attrs || {}) n.setAttribute(k, attrs[k]);
    if (text != null) n.textContent = text;
    return n;
  }
  function svg(tag, attrs, text) {
    var n = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) n.setAttribute(k, attrs[k]);
    if (text != null) n.textContent = text;
    return n;
  }
  function pct(x) { return x == null ? "—" : (x * 100).toFixed(1) + "%"; }
  function secs(x) { if (x == null) return "—"; return x < 60 ? Math.round(x) + "秒" : x < 3600 ? (x / 60).toFixed(1) + "分钟" : (x / 3600).toFixed(1) + "小时"; }

  // ---- charts -------------------------------------------------------------------------------
  function hbars(target, rows, label) {   // rows: [[name, value, title?]]
    var box = $(target); box.textContent = "";
    if (!rows.length) { box.appendChild(el("p", { class: "empty" }, "暂无数据")); return; }
    var max = Math.max.apply(null, rows.map(function (r) { return r[1]; })) || 1;
    var h = rows.length * 24 + 4, W = 420, L = 130;
    var s = svg("svg", { viewBox: "0 0 " + W + " " + h, role: "img", "aria-label": label });
    rows.forEach(function (r, i) {
      var w = Math.max(1, (W - L - 40) * r[1] / max), y = i * 24 + 2;
      s.appendChild(svg("text", { x: L - 6, y: y + 15, "text-anchor": "end" }, String(r[0]).slice(0, 16)));
      var bar = svg("rect", { x: L, y: y + 3, width: w, height: 16, fill: r[3] || "#0b6bcb", rx: 3 });
      bar.appendChild(svg("title", {}, r[0] + "：" + r[1]));
      s.appendChild(bar);
      s.appendChild(svg("text", { x: L + w + 4, y: y + 15 }, String(r[1])));
    });
    box.appendChild(s);
  }

  function stackedHours(target, byHour) {
    var box = $(target); box.textContent = "";
    var chans = Object.keys(byHour);
    var totals = []; for (var h = 0; h < 24; h++) totals.push(chans.reduce(function (a, c) { return a + byHour[c][h]; }, 0));
    var max = Math.max.apply(null, totals) || 1;
    var W = 760, H = 200, L = 30, B = 20, bw = (W - L) / 24;
    var s = svg("svg", { viewBox: "0 0 " + W + " " + (H + B), role: "img", "aria-label": "各时段咨询量柱状图" });
    [0, 0.5, 1].forEach(function (f) {
      var y = H - f * (H - 10);
      s.appendChild(svg("line", { x1: L, x2: W, y1: y, y2: y, stroke: "#eaecf0" }));
      s.appendChild(svg("text", { x: L - 4, y: y + 4, "text-anchor": "end" }, String(Math.round(max * f))));
    });
    for (h = 0; h < 24; h++) {
      var y0 = H;
      chans.forEach(function (c) {
        var v = byHour[c][h]; if (!v) return;
        var bh = (H - 10) * v / max;
        var r = svg("rect", { x: L + h * bw + 2, y: y0 - bh, width: bw - 4, height: bh, fill: COLORS[c] || "#888" });
        r.appendChild(svg("title", {}, h + "时 " + (CHANNEL[c] || c) + "：" + v));
        s.appendChild(r); y0 -= bh;
      });
      if (h % 2 === 0) s.appendChild(svg("text", { x: L + h * bw + bw / 2, y: H + 14, "text-anchor": "middle" }, h + "时"));
    }
    box.appendChild(s);
    var lg = el("div", { class: "legend" });
    chans.forEach(function (c) { var i = el("span"); i.appendChild(el("span", { class: "sw sw-" + c })); i.appendChild(document.createTextNode(CHANNEL[c] || c)); lg.appendChild(i); });
    box.appendChild(lg);
  }

  function kpis(t, sat, cb, defs) {
    var box = $("kpis"); box.textContent = "";
    [["会话量", t.conversations, "", "", "conversations"],
     ["自助解决率", pct(t.containment_rate), "", "", "containment_rate"],
     ["确认解决率", pct(t.confirmed_rate), "", "", "confirmed_rate"],
     ["未解决率", pct(t.unresolved_rate), "", "", "unresolved_rate"],
     ["重复来访率", pct(t.repeat_contact_rate), "", "", "repeat_contact_rate"],
     ["转人工率", pct(t.escalation_rate), "", "", "escalation_rate"],
     ["放弃会话", t.abandoned + "（" + pct(t.abandon_rate) + "）", "", "", "abandoned"],
     ["满意度", sat.average == null ? "—" : sat.average.toFixed(2) + " / 5", "", "", "satisfaction"],
     ["平均等待", secs(t.avg_wait_s), "", "", "avg_wait_s"], ["平均处理", secs(t.avg_handle_s), "", "", "avg_handle_s"],
     ["非工作时间回访", cb.count, cb.called_back ? "平均 " + secs(cb.avg_callback_s) + " 后回电" : "", "登记后由工作人员在服务时间回电，不计入平均等待", "callbacks"]].forEach(function (k) {
      var d = el("div", { class: "kpi" }); d.appendChild(el("div", { class: "v" }, String(k[1]))); d.appendChild(el("div", { class: "l" }, k[0]));
      if (k[2]) d.appendChild(el("div", { class: "s" }, k[2]));
      if (k[3]) d.title = k[3];
      var def = (defs || {})[k[4]];
      if (def) d.appendChild(el("div", { class: "d" }, def.slice(def.indexOf("：") + 1)));
      box.appendChild(d);
    });
  }

  var CLASSES = ["confirmed", "answered", "unresolved", "escalated", "abandoned"];
  var CLASS_COLORS = { confirmed: "#2ca02c", answered: "#98df8a", unresolved: "#d62728", escalated: "#ff7f0e", abandoned: "#7f7f7f" };
  function shareBar(s, labels) {   // one stacked bar of the five classes, with a title per part
    var box = el("span", { class: "sharebar", role: "img", "aria-label": CLASSES.map(function (c) { return labels[c] + " " + pct(s.shares[c]); }).join("，") });
    CLASSES.forEach(function (c) {
      if (!s[c]) return;
      var part = el("span", { class: "part", style: "width:" + (100 * s[c] / s.closed) + "%;background:" + CLASS_COLORS[c] });
      part.title = labels[c] + "：" + s[c] + "（" + pct(s.shares[c]) + "）";
      box.appendChild(part);
    });
    return box;
  }
  function resolution(r) {
    var lg = $("resolution-legend"); lg.textContent = "";
    CLASSES.forEach(function (c) { var i = el("span"); i.appendChild(el("span", { class: "sw", style: "background:" + CLASS_COLORS[c] })); i.appendChild(document.createTextNode(r.labels[c] + " " + r[c] + "（" + pct(r.shares[c]) + "）")); lg.appendChild(i); });
    if (r.open) lg.appendChild(el("span", {}, "进行中 " + r.open + "（不计入）"));
    var head = ["", "已结束提问会话"].concat(CLASSES.map(function (c) { return r.labels[c]; })).concat(["自助解决率", "构成"]);
    function row(name, s) { return [name, s.closed].concat(CLASSES.map(function (c) { return pct(s.shares[c]); })).concat([pct(s.containment_rate), shareBar(s, r.labels)]); }
    table("resolution-channels", head, Object.keys(r.by_channel).map(function (c) { return row(CHANNEL[c] || c, r.by_channel[c]); }));
    table("resolution-topics", head, r.by_topic.map(function (x) { return row(x.label || x.topic, x); }));
    table("resolution-reasons", ["原因", "会话数"], Object.keys(r.reasons).map(function (k) { return [r.reason_labels[k] || k, r.reasons[k]]; }));
  }
  function definitions(defs) {
    var dl = $("definitions"); dl.textContent = "";
    Object.keys(defs).forEach(function (k) {
      var text = defs[k], i = text.indexOf("：");
      dl.appendChild(el("dt", {}, text.slice(0, i))); dl.appendChild(el("dd", {}, text.slice(i + 1)));
    });
  }
  function entryLink(id, label, known) {
    if (!id || !known[id]) return label;
    return el("a", { href: "#entry-" + id }, label);
  }

  // A gap row opens a new knowledge point in the console under the entry the question came closest to,
  // pre-filled with the residents' wording (the sample, already masked); for those who may edit knowledge.
  function draftLink(g) {
    if (!g.nearest_entry || !g.samples.length || !me || RANK[me.role] < RANK.supervisor) return "";
    var q = new URLSearchParams({ "new": "point", entry: g.nearest_entry, question: g.samples[0] });
    return el("a", { href: "/staff/knowledge?" + q, class: "draft", title: "在知识库维护中新建一条知识点草稿" }, "新建知识点");
  }

  function table(id, head, rows) {
    var t = $(id); var cap = t.querySelector("caption"); t.textContent = ""; if (cap) t.appendChild(cap);
    var tr = el("tr"); head.forEach(function (h) { tr.appendChild(el("th", { scope: "col" }, h)); }); t.appendChild(el("thead")).appendChild(tr);
    var tb = el("tbody"); t.appendChild(tb);
    if (!rows.length) { var r = el("tr"); r.appendChild(el("td", { colspan: head.length, class: "empty" }, "暂无数据")); tb.appendChild(r); }
    rows.forEach(function (row) {
      var r = el("tr");
      row.forEach(function (c) { if (c instanceof Node) { var td = el("td"); td.appendChild(c); r.appendChild(td); } else r.appendChild(el("td", typeof c === "number" ? { class: "n" } : {}, c == null ? "—" : String(c))); });
      tb.appendChild(r);
    });
  }

  function render(f) {
    kpis(f.totals, f.satisfaction, f.callbacks, f.definitions);
    resolution(f.resolution);
    definitions(f.definitions || {});
    stackedHours("hours", f.by_hour);
    hbars("channels", Object.keys(f.by_channel).map(function (c) { return [CHANNEL[c] || c, f.by_channel[c], "", COLORS[c]]; }), "渠道分布");
    hbars("days", Object.keys(f.by_day).map(function (d) { return [d, f.by_day[d]]; }), "每日咨询量");
    hbars("intents", f.top_intents.map(function (x) { return [x.label || x.intent, x.count]; }), "热门意图");
    hbars("topics", f.top_topics.map(function (x) { return [x.label || x.topic, x.count]; }), "热门主题");
    hbars("satisfaction", ["5", "4", "3", "2", "1"].map(function (k) { return [k + "分", f.satisfaction.distribution[k]]; }), "满意度分布");
    hbars("outcomes", Object.keys(f.outcomes).map(function (o) { return [OUTCOME[o] || o, f.outcomes[o]]; }), "回复结果");
    table("regions", ["地区", "会话量", "提问会话", "自助解决率", "确认解决率", "未解决率", "转人工率", "满意度", "构成"], f.by_region.map(function (r) {
      return [r.region_name ? r.region_name + "（" + r.region + "）" : r.region, r.conversations, r.asked, pct(r.containment_rate),
              pct(r.confirmed_rate), pct(r.unresolved_rate), pct(r.escalation_rate), r.satisfaction, shareBar(r.resolution, f.resolution.labels)];
    }));
    var known = {};
    f.entry_quality.forEach(function (q) { known[q.entry] = true; });
    var editor = me && RANK[me.role] >= RANK.supervisor;
    table("gaps", ["最接近的知识条目 / 问题", "主题", "次数", "未答上", "追问", "低置信度", "问题示例（已脱敏）"].concat(editor ? ["补充知识"] : []), f.knowledge_gaps.map(function (g) {
      return [entryLink(g.nearest_entry, g.label, known), g.topic_label || g.topic, g.count, g.outcomes.abstained || 0, g.outcomes.clarifying || 0, g.outcomes.low_confidence || 0,
              el("span", { class: "samples" }, g.samples.join(" ｜ "))].concat(editor ? [draftLink(g)] : []);
    }));
    table("quality", ["知识条目", "主题", "被用来回答", "致谢确认", "换个说法再问", "说不对/没用", "之后转人工", "问题比例"], f.entry_quality.map(function (q) {
      return [q.title, q.topic_label || q.topic || "—", q.used, q.confirmed, q.rephrased, q.disputed, q.escalated, pct(q.problem_rate)];
    }));
    f.entry_quality.forEach(function (q, i) { $("quality").querySelectorAll("tbody tr")[i].id = "entry-" + q.entry; });
  }

  function params() {
    var p = new URLSearchParams({ from: $("from").value, to: $("to").value });
    if ($("region").value) p.set("region", $("region").value);
    if ($("channel").value) p.set("channel", $("channel").value);
    return p.toString();
  }
  function regions() {
    return api("/api/staff/analytics/regions").then(function (r) {
      var sel = $("region"), keep = sel.value || new URLSearchParams(location.search).get("region") || "";
      while (sel.options.length > 1) sel.remove(1);
      r.regions.forEach(function (g) { sel.appendChild(el("option", { value: g.code }, g.name ? g.name + "（" + g.code + "）" : g.code)); });
      sel.value = keep;
      if (sel.value !== keep) sel.value = "";
    }, function () { /* the filter keeps only 全部 */ });
  }
  function load() {
    $("status").textContent = "加载中…";
    return api("/api/staff/analytics?" + params()).then(function (f) { render(f); $("status").textContent = "已更新（" + f.range.from + " 至 " + f.range.to + "）"; }, fail);
  }
  function fail(e) {
    if (e.status === 401) { sessionStorage.removeItem(TOKEN_KEY); show("login"); return; }
    $("status").textContent = e.message;
  }

  function start() {
    var today = new Date(Date.now() + 8 * 3600e3).toISOString().slice(0, 10);
    var week = new Date(Date.now() + 8 * 3600e3 - 6 * 86400e3).toISOString().slice(0, 10);
    var q = new URLSearchParams(location.search);
    $("from").value = q.get("from") || week; $("to").value = q.get("to") || today;
    if (!token()) { show("login"); return; }
    api("/api/staff/me").then(function (user) {
      me = user;
      $("who").textContent = (me.display_name || me.username) + "（" + (ROLE[me.role] || me.role) + "）";
      show("dash");
      return regions().then(load);
    }, fail);
  }

  $("login-form").addEventListener("submit", function (ev) {
    ev.preventDefault(); $("login-error").textContent = "";
    api("/api/staff/login", { method: "POST", body: { username: $("username").value, password: $("password").value } })
      .then(function (r) { sessionStorage.setItem(TOKEN_KEY, r.token); start(); }, function (e) { $("login-error").textContent = e.message; });
  });
  $("logout").addEventListener("click", function () { api("/api/staff/logout", { method: "POST" }).catch(function () {}).then(function () { sessionStorage.removeItem(TOKEN_KEY); show("login"); }); });
  $("filters").addEventListener("submit", function (ev) { ev.preventDefault(); load(); });
  $("export").addEventListener("click", function () {
    api("/api/staff/analytics/export.csv?" + params(), { raw: true }).then(function (res) {
      var name = (/filename="([^"]+)"/.exec(res.headers.get("content-disposition") || "") || [])[1] || "export.csv";
      return res.blob().then(function (b) { var a = el("a", { href: URL.createObjectURL(b), download: name }); document.body.appendChild(a); a.click(); a.remove(); });
    }).catch(fail);
  });
  start();
})();
