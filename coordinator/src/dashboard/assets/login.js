// The login form: sends the token once; the server answers with a cookie the page and its
// event stream carry from then on.
"use strict";
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = document.getElementById("login-error");
  out.textContent = "";
  const token = document.getElementById("token").value;
  try {
    const res = await fetch("/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }),
    });
    if (res.ok) {
      location.reload();
      return;
    }
    const body = await res.json().catch(() => ({}));
    out.textContent = body.error || `log in failed (${res.status})`;
  } catch (e) {
    out.textContent = `cannot reach the coordinator: ${e}`;
  }
});
