// The demo page: rooms, direct messages and notifications on ONE connection
// (LongConn.session(): the subscriptions protocol), chat with history, presence with
// heartbeat latency, uploads. Everything about connections is done by longconn.js.
(function () {
  "use strict";

  var qs = new URLSearchParams(location.search);
  var $ = function (id) {
    return document.getElementById(id);
  };

  function randomName() {
    var animals = ["otter", "lynx", "heron", "ibex", "puffin", "gecko", "marten", "wren"];
    return animals[Math.floor(Math.random() * animals.length)] + "-" + Math.floor(100 + Math.random() * 900);
  }

  var user = qs.get("user") || sessionStorage.getItem("longconn-demo-user") || randomName();
  sessionStorage.setItem("longconn-demo-user", user);
  var room = qs.get("room") || "lobby";
  var transport = qs.get("transport") || "auto";
  var backoffMax = Number(qs.get("backoff_max") || 5000);

  var config = null; // from /api/config
  var conn = null; // the page's one connection (a LongConn.Session)
  var roomSub = null; // its subscription to "room:<room>"
  var joining = 0; // the latest joinRoom() call
  var seen = new Set(); // room cursors already rendered (history and live overlap)
  var state = { reconnects: 0, resyncs: 0, opened: 0, lastTransport: null, progress: [], closes: [] };
  window.demo = { state: state, get conn() { return conn; } };

  $("me").textContent = user;
  $("transport").value = transport;

  function setNotice(text, kind) {
    var n = $("notice");
    n.hidden = !text;
    n.textContent = text || "";
    n.className = kind || "";
  }

  function api(path, options) {
    return fetch(path, options).then(function (res) {
      if (!res.ok) throw new Error(path + ": HTTP " + res.status);
      return res.json();
    });
  }

  function time(ts) {
    var d = ts ? new Date(ts * 1000) : new Date();
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function fmtSize(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1048576).toFixed(1) + " MiB";
  }

  // ------------------------------------------------------------ rendering

  function addLine(cls, build, cursor) {
    var li = document.createElement("li");
    li.className = cls;
    if (cursor) li.dataset.cursor = cursor;
    build(li);
    var list = $("messages");
    var atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(li);
    if (atBottom) list.scrollTop = list.scrollHeight;
    return li;
  }

  function system(text) {
    addLine("system", function (li) {
      li.textContent = text;
    });
  }

  function render(msg, cursor, fromHistory) {
    if (cursor) {
      if (seen.has(cursor)) return;
      seen.add(cursor);
      $("cursor").textContent = cursor;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "presence") {
      renderPresence(msg);
      return;
    }
    var cls = (msg.type === "file" ? "file" : "chat") + (fromHistory ? " history" : "");
    addLine(cls, function (li) {
      var who = document.createElement("span");
      who.className = "who";
      who.textContent = msg.user || "?";
      li.appendChild(who);
      if (msg.type === "file") {
        var a = document.createElement("a");
        a.href = msg.url;
        a.textContent = msg.name;
        a.setAttribute("download", msg.name);
        li.appendChild(document.createTextNode("uploaded "));
        li.appendChild(a);
        li.appendChild(document.createTextNode(" (" + fmtSize(msg.size) + ") "));
        var sha = document.createElement("span");
        sha.className = "sha";
        sha.textContent = "sha256 " + msg.sha256;
        li.appendChild(sha);
      } else {
        var text = document.createElement("span");
        text.className = "text";
        text.textContent = msg.text;
        li.appendChild(text);
      }
      var when = document.createElement("span");
      when.className = "when";
      when.textContent = time(msg.time);
      li.appendChild(when);
    }, cursor);
  }

  function notSent(reason, text) {
    setNotice("Not sent: " + reason, "error");
    system("— not sent (" + reason + ") —");
    var input = $("text");
    if (text && !input.value) input.value = text; // let the user try again
  }

  function renderPresence(p) {
    var ul = $("members");
    ul.textContent = "";
    (p.members || []).forEach(function (m) {
      var li = document.createElement("li");
      li.dataset.user = m.user;
      var name = document.createElement("span");
      name.className = "name";
      name.textContent = m.user + (m.user === user ? " (you)" : "");
      name.title = "send a direct message";
      name.addEventListener("click", function () {
        $("dm-to").value = m.user;
        $("dm-text").focus();
      });
      var tr = document.createElement("span");
      tr.className = "tr";
      tr.textContent = m.transport;
      name.appendChild(tr);
      var lat = document.createElement("span");
      lat.className = "lat";
      lat.textContent = m.latency_ms === null || m.latency_ms === undefined ? "–" : m.latency_ms.toFixed(1) + " ms";
      li.appendChild(name);
      li.appendChild(lat);
      ul.appendChild(li);
    });
    $("member-count").textContent = p.count + (p.count === 1 ? " member" : " members");
    loadRooms();
  }

  function loadRooms() {
    return api("/api/rooms").then(function (body) {
      var ul = $("rooms");
      ul.textContent = "";
      var names = body.rooms.map(function (r) {
        return r.name;
      });
      if (names.indexOf(room) < 0) body.rooms.push({ name: room, count: 0 });
      body.rooms.forEach(function (r) {
        var li = document.createElement("li");
        var a = document.createElement("a");
        a.href = "?room=" + encodeURIComponent(r.name);
        a.dataset.room = r.name;
        if (r.name === room) a.className = "current";
        var n = document.createElement("span");
        n.textContent = "# " + r.name;
        var c = document.createElement("span");
        c.className = "count";
        c.textContent = r.count;
        a.appendChild(n);
        a.appendChild(c);
        a.addEventListener("click", function (ev) {
          ev.preventDefault();
          joinRoom(r.name);
        });
        li.appendChild(a);
        ul.appendChild(li);
      });
    }).catch(function () {
      /* the room list is decoration; the connection status shows real trouble */
    });
  }

  function renderDm(msg) {
    if (!msg || msg.type !== "dm") return;
    var li = document.createElement("li");
    li.className = "dm" + (msg.from === user ? " mine" : "");
    var who = document.createElement("span");
    who.className = "who";
    who.textContent = msg.from === user ? "to " + msg.to : msg.from;
    var text = document.createElement("span");
    text.className = "dm-text";
    text.textContent = msg.text;
    li.appendChild(who);
    li.appendChild(text);
    $("dms").appendChild(li);
  }

  function renderNotice(msg) {
    if (!msg || msg.type !== "notice") return;
    var li = document.createElement("li");
    li.className = "notice";
    li.textContent = time(msg.time) + " " + msg.text;
    if (msg.url) {
      li.appendChild(document.createTextNode(" "));
      var a = document.createElement("a");
      a.href = msg.url;
      a.textContent = "download";
      li.appendChild(a);
    }
    var list = $("notifications");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > 20) list.removeChild(list.lastChild);
  }

  // ------------------------------------------------------------ connection

  function roomPath(prefix) {
    return prefix + encodeURIComponent(room);
  }

  // Load the recent history over HTTP; the room is then subscribed from its cursor:
  // every transport resumes the same way and nothing falls between history and live.
  function loadHistory() {
    return api(roomPath("/api/history/")).then(function (body) {
      body.messages.forEach(function (m) {
        render(m.data, m.cursor, true);
      });
      if (body.presence) renderPresence(body.presence);
      return body.cursor;
    });
  }

  function countResync(info) {
    state.resyncs++;
    $("resyncs").textContent = state.resyncs;
    return info.reason || "history lost";
  }

  function roomResync(info) {
    var reason = countResync(info);
    setNotice(
      "Resync: the server no longer has the messages after your last cursor (" +
        reason +
        "). The room was reloaded; messages sent while you were away may be missing.",
      "resync"
    );
    system("— resynced (" + reason + ") —");
    // Show what the server has now; the subscription already continues after the
    // notice's cursor, and `seen` keeps anything rendered twice out.
    loadHistory();
  }

  // One connection for everything: direct messages and notifications now, the room
  // once its history is loaded (joinRoom). Each topic resumes from its own cursor.
  function connect() {
    conn = LongConn.session({
      url: "/ws",
      sseUrl: "/sse",
      pollUrl: "/poll",
      transport: transport,
      params: { user: user },
      backoff: { base: 250, max: backoffMax },
      idleTimeout: config.idle_timeout ? config.idle_timeout * 1000 : null,
      onStatus: function (s) {
        var pill = $("status");
        pill.dataset.state = s.state;
        pill.dataset.transport = s.transport || "";
        if (s.state === "waiting") state.closes.push({ code: s.code, reason: s.reason });
        var text = s.state + (s.transport ? " · " + s.transport : "");
        if (s.state === "waiting") text += " · retry in " + (s.delay / 1000).toFixed(1) + " s";
        pill.textContent = text;
        $("send").disabled = s.state !== "open";
        $("dm-send").disabled = s.state !== "open";
        if (s.state === "open") {
          state.opened++;
          if (state.opened > 1) {
            state.reconnects++;
            $("reconnects").textContent = state.reconnects;
          }
          state.lastTransport = s.transport;
          if (!$("notice").classList.contains("resync")) setNotice("");
        } else if (s.state === "waiting" && state.opened > 0) {
          if (!$("notice").classList.contains("resync")) {
            setNotice(
              "Connection lost; reconnecting and resuming every topic from its cursor (room: " +
                (roomSub && roomSub.cursor) +
                ") …",
              ""
            );
          }
        }
      },
    });
    conn.subscribe("dm:" + user, {
      onMessage: renderDm,
      onResync: function (info) {
        system("— direct messages resynced (" + countResync(info) + ") —");
      },
    });
    conn.subscribe("notify", { onMessage: renderNotice, onResync: countResync });
  }

  function joinRoom(name) {
    var token = ++joining;
    if (roomSub) roomSub.unsubscribe(); // the same connection: the other topics go on
    roomSub = null;
    room = name;
    seen.clear();
    qs.set("room", room);
    history.replaceState(null, "", "?" + qs.toString());
    $("room-title").textContent = room;
    $("messages").textContent = "";
    $("members").textContent = "";
    setNotice("");
    loadRooms();
    return loadHistory()
      .then(function (cursor) {
        if (token !== joining) return; // another room was chosen meanwhile
        roomSub = conn.subscribe("room:" + room, {
          cursor: cursor,
          onMessage: function (data, c) {
            render(data, c, false);
          },
          onResync: roomResync,
          onError: function (err) {
            setNotice("Could not join the room: " + err.message, "resync");
          },
        });
      })
      .catch(function (err) {
        setNotice("Could not load the room: " + err.message, "resync");
      });
  }

  // ------------------------------------------------------------ forms

  // Sending: a call on WebSocket (answered once published), else a POST; both let
  // the server check the message and stamp its sender. Rejects with the reason.
  function sendMessage(method, params, path, body) {
    if (conn.transport === "websocket" && conn.state === "open") return conn.call(method, params);
    return fetch(path + "?user=" + encodeURIComponent(user), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    }).then(function (res) {
      if (res.ok) return null;
      return res
        .json()
        .catch(function () {
          return {};
        })
        .then(function (b) {
          throw new Error(b.reason || "HTTP " + res.status);
        });
    });
  }

  $("send-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var input = $("text");
    var text = input.value.trim();
    if (!text || !conn) return;
    sendMessage("chat.send", { room: room, text: text }, roomPath("/api/send/"), { type: "chat", text: text }).then(
      function () {
        if (input.value.trim() === text) input.value = "";
      },
      function (err) {
        notSent(err.message, text);
      }
    );
  });

  $("dm-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var to = $("dm-to").value.trim();
    var input = $("dm-text");
    var text = input.value.trim();
    if (!text || !to || !conn) return;
    sendMessage("dm.send", { to: to, text: text }, "/api/dm/" + encodeURIComponent(to), { type: "dm", text: text }).then(
      function () {
        if (input.value.trim() === text) input.value = "";
      },
      function (err) {
        notSent(err.message, null);
      }
    );
  });

  $("room-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var name = $("room-name").value.trim();
    if (/^[A-Za-z0-9_-]{1,40}$/.test(name)) {
      $("room-name").value = "";
      joinRoom(name);
    }
  });

  $("transport").addEventListener("change", function () {
    transport = $("transport").value;
    qs.set("transport", transport);
    history.replaceState(null, "", "?" + qs.toString());
    if (conn) conn.setTransport(transport); // every topic resumes from its cursor
  });

  $("upload-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var file = $("file").files[0];
    if (!file) return;
    var protocol = $("upload-protocol").value;
    var bar = $("upload-progress");
    var status = $("upload-status");
    var button = $("upload");
    bar.hidden = false;
    bar.value = 0;
    state.progress = [];
    button.disabled = true;
    status.textContent = "uploading " + file.name + " …";
    status.dataset.state = "uploading";
    LongConn.upload(file, {
      protocol: protocol,
      endpoint: "/files/",
      url: "/ws-upload",
      metadata: { room: room, user: user },
      onProgress: function (sent, total) {
        state.progress.push([sent, total]);
        bar.value = total ? sent / total : 1;
        bar.dataset.sent = sent;
        status.textContent = "uploading " + file.name + ": " + fmtSize(sent) + " / " + fmtSize(total);
      },
    })
      .then(function (result) {
        // The server announced the finished upload in the room; fetch its details.
        var id = result.id || new URL(result.url, location.href).pathname.split("/").pop();
        return api("/api/files/" + encodeURIComponent(id));
      })
      .then(function (file) {
        bar.value = 1;
        status.dataset.state = "done";
        status.textContent = "";
        var a = document.createElement("a");
        a.href = file.url;
        a.id = "upload-link";
        a.textContent = "download " + file.name;
        a.setAttribute("download", file.name);
        status.appendChild(a);
        var sha = document.createElement("div");
        sha.className = "sha";
        sha.id = "upload-sha";
        sha.textContent = "sha256 " + file.sha256;
        status.appendChild(sha);
      })
      .catch(function (err) {
        status.dataset.state = "error";
        status.textContent = "upload failed: " + err.message;
      })
      .then(function () {
        button.disabled = false;
      });
  });

  // ------------------------------------------------------------ start

  api("/api/config")
    .then(function (c) {
      config = c;
      connect();
      return joinRoom(room);
    })
    .catch(function (err) {
      setNotice("Could not reach the demo server: " + err.message, "resync");
    });
})();
