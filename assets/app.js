// Mipha Chat's page behaviour that lives in the browser: the address bar, back/forward,
// clicks inside messages, the length counter, focus, the phone drawer, clean copies and the
// light/dark toggle. It talks to the server only through two hidden fields the page defines:
// #conversation-address (the server writes the open conversation's id) and #page-action
// (this script writes a small JSON action; the server checks it like any other input).
(() => {
  "use strict";

  const NARROW = "(max-width: 768px)";
  const THEME_KEY = "mipha-theme";
  let actionCount = 0;
  let followingHistory = false;

  const field = (id) => document.querySelector(`#${id} textarea, #${id} input`);
  const isNarrow = () => window.matchMedia(NARROW).matches;

  // --- hidden fields ----------------------------------------------------------------------

  function sendAction(action) {
    const input = field("page-action");
    if (!input) return;
    actionCount += 1;
    input.value = JSON.stringify({ ...action, n: actionCount });
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  // --- the address follows the open conversation; back/forward move between them ---------

  function addressFor(id) {
    const url = new URL(window.location.href);
    if (id) url.searchParams.set("c", id);
    else url.searchParams.delete("c");
    return url;
  }

  function syncAddress() {
    const input = field("conversation-address");
    if (!input) return;
    const id = input.value.trim();
    const current = new URL(window.location.href).searchParams.get("c") || "";
    if (id === current) {
      followingHistory = false;
      return;
    }
    if (followingHistory) return; // the server has not answered the back/forward yet
    window.history.pushState({ conversation: id }, "", addressFor(id));
  }

  window.addEventListener("popstate", () => {
    followingHistory = true;
    sendAction({ action: "open", conversation: new URL(window.location.href).searchParams.get("c") || "" });
  });

  // --- clicks inside messages: edit a question, switch between versions -----------------

  document.addEventListener("click", (event) => {
    const button = event.target.closest("#chatbot button.message-action[data-action]");
    if (button && !button.disabled) {
      event.preventDefault();
      event.stopPropagation();
      const message = Number.parseInt(button.dataset.message, 10);
      if (Number.isSafeInteger(message)) sendAction({ action: button.dataset.action, message });
      if (button.dataset.action === "edit") focusComposer();
      return;
    }
    const copyLink = event.target.closest("button.copy-share-link");
    if (copyLink) {
      const link = copyLink.parentElement.querySelector("a");
      if (link) navigator.clipboard?.writeText(new URL(link.getAttribute("href"), window.location.href).href);
      copyLink.textContent = "Copied";
      return;
    }
    if (event.target.closest("#send-button")) setTimeout(focusComposer, 50);
    if (event.target.closest("#conversation-list label, #new-chat-button") && isNarrow()) closeDrawer();
  }, true);

  // --- the composer: focus, length counter -------------------------------------------------

  function focusComposer() {
    const input = field("chat-input");
    if (input && !input.disabled) input.focus();
  }

  function codePoints(text) {
    let count = 0;
    for (const _ of text) count += 1;
    return count;
  }

  function updateCounter() {
    const counter = document.getElementById("char-counter");
    const input = field("chat-input");
    const send = document.getElementById("send-button");
    if (!counter || !input) return;
    const limit = Number.parseInt(counter.dataset.max, 10) || 0;
    const length = codePoints(input.value);
    const over = limit > 0 && length > limit;
    counter.classList.toggle("over", over);
    if (over) {
      counter.textContent = `${length.toLocaleString()} / ${limit.toLocaleString()} characters: ` +
        `${(length - limit).toLocaleString()} too many. Shorten the message to send it.`;
    } else if (limit > 0 && length >= limit * 0.8) {
      counter.textContent = `${length.toLocaleString()} / ${limit.toLocaleString()} characters`;
    } else {
      counter.textContent = "";
    }
    if (send) {
      if (over && !send.disabled) {
        send.disabled = true;
        send.dataset.tooLong = "1";
      } else if (!over && send.dataset.tooLong) {
        delete send.dataset.tooLong;
        send.disabled = false;
      }
      if (over) send.setAttribute("aria-describedby", "char-counter");
      else send.removeAttribute("aria-describedby");
    }
  }

  document.addEventListener("input", (event) => {
    if (event.target.closest && event.target.closest("#chat-input")) updateCounter();
  }, true);

  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && event.target.closest && event.target.closest("#chat-input")) {
      setTimeout(focusComposer, 50);
    }
  }, true);

  // --- phone: the sidebar is a drawer that closes once a conversation is chosen -----------

  function closeDrawer() {
    const sidebar = document.querySelector(".sidebar.open, .sidebar[open]");
    const toggle = sidebar && sidebar.querySelector(".toggle-button");
    if (toggle) setTimeout(() => toggle.click(), 150);
  }

  // --- copy gives clean text: no markup, no version switcher, no speed footer -------------

  function cleanText(html) {
    const doc = new DOMParser().parseFromString(html, "text/html"); // inert: loads and runs nothing
    doc.querySelectorAll(".message-controls, .reply-footer, .branch-switch").forEach((el) => el.remove());
    doc.querySelectorAll("li").forEach((li) => li.prepend(doc.createTextNode("- ")));
    doc.querySelectorAll("br").forEach((br) => br.replaceWith(doc.createTextNode("\n")));
    doc.querySelectorAll("p, li, pre, h1, h2, h3, h4, h5, h6, blockquote, tr").forEach((el) => {
      el.append(doc.createTextNode("\n"));
    });
    return doc.body.textContent.replace(/\n{3,}/g, "\n\n").trim();
  }

  if (navigator.clipboard && navigator.clipboard.writeText) {
    const writeText = navigator.clipboard.writeText.bind(navigator.clipboard);
    navigator.clipboard.writeText = (text) => {
      const looksRendered = typeof text === "string" && /<\/?(p|pre|ul|ol|div|span|code|em|strong|a)\b/.test(text);
      return writeText(looksRendered ? cleanText(text) : text);
    };
  }

  // --- light/dark: follows the system until the person picks one -------------------------

  function applyTheme(theme) {
    const dark = theme === "dark" || (theme !== "light" && window.matchMedia("(prefers-color-scheme: dark)").matches);
    document.body.classList.toggle("dark", dark);
    const toggle = document.getElementById("theme-toggle");
    if (toggle) {
      toggle.setAttribute("aria-pressed", String(dark));
      toggle.textContent = dark ? "Light mode" : "Dark mode";
    }
  }

  function storedTheme() {
    try {
      return window.localStorage.getItem(THEME_KEY);
    } catch {
      return null;
    }
  }

  document.addEventListener("click", (event) => {
    if (!event.target.closest("#theme-toggle")) return;
    const dark = !document.body.classList.contains("dark");
    try {
      window.localStorage.setItem(THEME_KEY, dark ? "dark" : "light");
    } catch {
      // private windows may refuse storage: the choice then lasts for this page only
    }
    applyTheme(dark ? "dark" : "light");
  });

  // --- start ------------------------------------------------------------------------------

  let themed = false;
  let drawerChecked = false;
  setInterval(() => {
    syncAddress();
    const toggle = document.getElementById("theme-toggle");
    if (toggle && !themed) {
      themed = true;
      applyTheme(storedTheme());
    }
    if (!drawerChecked && document.querySelector(".sidebar")) {
      drawerChecked = true;
      if (isNarrow()) closeDrawer();
    }
  }, 250);
})();
