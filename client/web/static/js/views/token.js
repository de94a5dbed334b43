// Asks for a token where the gateway has --tokens; keeps it for this tab.

import { api, onUnauthorized, setToken, token } from "../api.js";
import { $ } from "../dom.js";

export function setupToken(onNewToken) {
  const dialog = $("token-dialog");
  const form = $("token-form");
  const ask = (message) => {
    $("token-error").textContent = token() ? message || "" : "";
    if (!dialog.open) dialog.showModal();
  };
  onUnauthorized(ask);
  $("token-button").addEventListener("click", () => ask(""));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    setToken(String(new FormData(form).get("token") || "").trim());
    try {
      await api("/api/tasks?limit=1");
      dialog.close();
      onNewToken();
    } catch (err) {
      $("token-error").textContent = err.message;
      if (!dialog.open) dialog.showModal();
    }
  });
}
