"""Hand-written pages that meet every requirement of the frontend tests (the passing replies of tests/test_frontend.py;
the failing ones are these pages broken one way at a time)."""
from __future__ import annotations

from steps.evalsuite.frontend import _STATES


def document(title: str, css: str, body: str, js: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{title}</title>\n"
            f"<style>\n{css}\n</style>\n</head>\n<body>\n{body}\n<script>\n{js}\n</script>\n</body>\n</html>\n")


WEATHER = document("Weather", """
:root { --bg: #f4f6fb; --fg: #1d2433; --card: #ffffff; }
@media (prefers-color-scheme: dark) { :root { --bg: #10131a; --fg: #e8ecf4; --card: #1b2030; } }
body { background: var(--bg); color: var(--fg); font-family: sans-serif; margin: 0; padding: 1rem; }
.card { background: var(--card); border-radius: 8px; padding: 1rem; }
#forecast { display: grid; grid-template-columns: repeat(5, 1fr); gap: .5rem; margin-top: 1rem; }
@media (max-width: 600px) { #forecast { grid-template-columns: 1fr; } }
""", """
<h1>Lisbon</h1>
<button id="unit-toggle" type="button">Show °F</button>
<section id="current" class="card"><p>Now: <span class="temp" data-c="21">21°C</span>, sunny</p></section>
<section id="forecast">
  <div class="day card">Mon <span class="temp" data-c="22">22°C</span></div>
  <div class="day card">Tue <span class="temp" data-c="19">19°C</span></div>
  <div class="day card">Wed <span class="temp" data-c="18">18°C</span></div>
  <div class="day card">Thu <span class="temp" data-c="20">20°C</span></div>
  <div class="day card">Fri <span class="temp" data-c="23">23°C</span></div>
</section>
""", """
let fahrenheit = false;
document.getElementById("unit-toggle").addEventListener("click", (event) => {
  fahrenheit = !fahrenheit;
  for (const el of document.querySelectorAll(".temp")) {
    const c = Number(el.dataset.c);
    el.textContent = fahrenheit ? `${Math.round(c * 9 / 5 + 32)}°F` : `${c}°C`;
  }
  event.target.textContent = fahrenheit ? "Show °C" : "Show °F";
});
""")

PRODUCT = document("Product", """
body { font-family: sans-serif; margin: 0 0 4rem; }
#main-image { width: 320px; height: 240px; background: #ddd; }
.thumb { width: 64px; height: 48px; cursor: pointer; }
[role=tabpanel][hidden] { display: none; }
#buy-bar { background: #222; color: #fff; padding: .5rem; }
@media (max-width: 767px) { #buy-bar { position: fixed; bottom: 0; left: 0; right: 0; } }
""", """
<img id="main-image" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" alt="Product">
<div id="thumbs">
  <img class="thumb" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" alt="one">
  <img class="thumb" src="data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///ywAAAAAAQABAAACAUwAOw==" alt="two">
  <img class="thumb" src="data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACwAAAAAAQABAAACAkQBADs=" alt="three">
</div>
<div><button class="swatch" type="button">Red</button><button class="swatch" type="button">Blue</button>
<button class="swatch" type="button">Green</button></div>
<p id="price">$49.00</p>
<button id="qty-minus" type="button">-</button><input type="number" id="qty" value="1" min="1">
<button id="qty-plus" type="button">+</button>
<div role="tablist"><button role="tab" type="button">Description</button><button role="tab" type="button">
Specifications</button><button role="tab" type="button">Reviews</button></div>
<div role="tabpanel">A fine product.</div><div role="tabpanel" hidden>Weight: 1 kg</div>
<div role="tabpanel" hidden>Five stars.</div>
<div id="buy-bar">$49.00 <button type="button">Add to cart</button></div>
""", """
const main = document.getElementById("main-image");
document.querySelectorAll(".thumb").forEach((t) => t.addEventListener("click", () => { main.src = t.src; }));
const qty = document.getElementById("qty");
document.getElementById("qty-plus").addEventListener("click", () => { qty.value = Number(qty.value) + 1; });
document.getElementById("qty-minus").addEventListener("click", () => {
  qty.value = Math.max(1, Number(qty.value) - 1);
});
const tabs = [...document.querySelectorAll("[role=tab]")];
const panels = [...document.querySelectorAll("[role=tabpanel]")];
tabs.forEach((tab, i) => tab.addEventListener("click", () => panels.forEach((p, j) => { p.hidden = i !== j; })));
""")

LANDING = document("Landing", """
body { margin: 0; font-family: sans-serif; }
nav { position: sticky; top: 0; background: #fff; padding: 1rem; }
nav.scrolled { box-shadow: 0 2px 6px rgba(0, 0, 0, .2); }
.hero { height: 100vh; background: linear-gradient(120deg, #ff6b6b, #5f27cd, #48dbfb); background-size: 300% 300%;
        animation: shift 8s ease infinite; }
@keyframes shift { 0% { background-position: 0% 50%; } 100% { background-position: 100% 50%; } }
.reveal { min-height: 80vh; opacity: 0; transition: opacity .6s; }
.reveal.visible { opacity: 1; }
.testimonial { display: none; }
.testimonial.active { display: block; }
""", """
<nav>Acme</nav>
<header class="hero"><h1 id="typed"></h1></header>
<section class="reveal">Fast</section><section class="reveal">Secure</section><section class="reveal">Simple</section>
<div id="testimonials"><p class="testimonial active">Great!</p><p class="testimonial">Love it.</p>
<p class="testimonial">Superb.</p></div>
<div id="pricing"><div class="tier">Free</div><div class="tier">Pro</div><div class="tier">Team</div></div>
""", """
const nav = document.querySelector("nav");
window.addEventListener("scroll", () => nav.classList.toggle("scrolled", window.scrollY > 50));
const text = "Ship faster with Acme";
let n = 0;
setInterval(() => {          // types the line, holds it a moment, types it again
  n = n >= text.length + 8 ? 1 : n + 1;
  document.getElementById("typed").textContent = text.slice(0, n);
}, 60);
const observer = new IntersectionObserver((entries) => {
  for (const e of entries) if (e.isIntersecting) e.target.classList.add("visible");
});
document.querySelectorAll(".reveal").forEach((el) => observer.observe(el));
const quotes = [...document.querySelectorAll(".testimonial")];
let current = 0;
setInterval(() => {
  quotes[current].classList.remove("active");
  current = (current + 1) % quotes.length;
  quotes[current].classList.add("active");
}, 4000);
""")

ANALYTICS = document("Analytics", """
body { margin: 0; background: #111827; color: #e5e7eb; font-family: sans-serif; display: grid;
       grid-template-columns: 200px 1fr; }
#sidebar { background: #1f2937; width: 200px; }
#sidebar.collapsed { width: 48px; }
#tooltip { position: absolute; display: none; background: #000; padding: 4px; }
th { cursor: pointer; }
""", """
<aside id="sidebar"><button id="sidebar-toggle" type="button">☰</button></aside>
<main>
<svg id="bars" width="300" height="120">
  <rect x="0" y="20" width="40" height="100" data-v="100"></rect>
  <rect x="50" y="60" width="40" height="60" data-v="60"></rect>
  <rect x="100" y="40" width="40" height="80" data-v="80"></rect>
  <rect x="150" y="90" width="40" height="30" data-v="30"></rect>
  <rect x="200" y="10" width="40" height="110" data-v="110"></rect>
</svg>
<svg id="donut" width="120" height="120" viewBox="0 0 42 42">
  <circle cx="21" cy="21" r="15.9" fill="none" stroke="#f87171" stroke-width="6" stroke-dasharray="40 60"></circle>
  <circle cx="21" cy="21" r="15.9" fill="none" stroke="#60a5fa" stroke-width="6" stroke-dasharray="35 65"
          stroke-dashoffset="-40"></circle>
  <circle cx="21" cy="21" r="15.9" fill="none" stroke="#34d399" stroke-width="6" stroke-dasharray="25 75"
          stroke-dashoffset="-75"></circle>
</svg>
<div id="tooltip"></div>
<table id="data"><thead><tr><th>Name</th><th>Visits</th><th>Sales</th></tr></thead>
<tbody><tr><td>Oslo</td><td>10</td><td>3</td></tr><tr><td>Bergen</td><td>20</td><td>5</td></tr>
<tr><td>Tromsø</td><td>5</td><td>1</td></tr><tr><td>Alta</td><td>7</td><td>2</td></tr>
<tr><td>Narvik</td><td>9</td><td>4</td></tr><tr><td>Molde</td><td>3</td><td>1</td></tr></tbody></table>
</main>
""", """
const tip = document.getElementById("tooltip");
document.querySelectorAll("#bars rect").forEach((bar) => {
  bar.addEventListener("mouseenter", (e) => {
    tip.textContent = bar.dataset.v; tip.style.display = "block";
    tip.style.left = `${e.pageX}px`; tip.style.top = `${e.pageY}px`;
  });
  bar.addEventListener("mouseleave", () => { tip.style.display = "none"; });
});
document.querySelectorAll("#data th").forEach((th, col) => {
  let ascending = true;
  th.addEventListener("click", () => {
    const body = document.querySelector("#data tbody");
    const rows = [...body.rows].sort((a, b) => {
      const x = a.cells[col].textContent, y = b.cells[col].textContent;
      const order = col === 0 ? x.localeCompare(y) : Number(x) - Number(y);
      return ascending ? order : -order;
    });
    ascending = !ascending;
    rows.forEach((r) => body.appendChild(r));
  });
});
document.getElementById("sidebar-toggle").addEventListener("click", () => {
  document.getElementById("sidebar").classList.toggle("collapsed");
});
""")

_OPTIONS = "\n".join(f"<option>{s}</option>" for s in _STATES)
REGISTRATION = document("Register", """
body { font-family: sans-serif; }
.step { display: none; transition: opacity .3s ease; }
.step.current { display: block; }
#success { display: none; position: fixed; inset: 30%; background: #fff; border: 1px solid #999; }
#success.open { display: block; }
.error { color: #b00; }
""", f"""
<form id="wizard">
<div class="step current"><label>Name <input id="name" required></label>
<label>Email <input type="email" id="email" required></label><p class="error" id="email-error"></p></div>
<div class="step"><label>Password <input type="password" id="password"></label><p id="strength">Weak</p></div>
<div class="step"><label>State <select id="state">{_OPTIONS}</select></label></div>
<button type="button" id="back">Back</button><button type="button" id="next">Next</button>
</form>
<div id="success" role="dialog">Welcome aboard!</div>
""", """
const steps = [...document.querySelectorAll(".step")];
let at = 0;
function show(i) { steps.forEach((s, j) => s.classList.toggle("current", i === j)); at = i; }
document.getElementById("next").addEventListener("click", () => {
  const email = document.getElementById("email");
  if (at === 0 && !email.checkValidity()) {
    document.getElementById("email-error").textContent = "Invalid email";
    return;
  }
  if (at < steps.length - 1) show(at + 1); else document.getElementById("success").classList.add("open");
});
document.getElementById("back").addEventListener("click", () => { if (at > 0) show(at - 1); });
document.getElementById("password").addEventListener("input", (e) => {
  const p = e.target.value;
  const strong = p.length >= 12 && /[A-Z]/.test(p) && /[a-z]/.test(p) && /\\d/.test(p) && /[^\\w]/.test(p);
  document.getElementById("strength").textContent = p.length < 8 ? "Weak" : strong ? "Strong" : "Medium";
});
""")

SNAKE = document("Snake", """
body { background: #0b0f14; color: #cfd8dc; font-family: monospace; }
canvas { background: #111; display: block; }
""", """
<p>Score: <span id="score">0</span> Best: <span id="high-score">0</span></p>
<canvas id="game" width="200" height="200"></canvas>
""", """
const canvas = document.getElementById("game"), g = canvas.getContext("2d"), cell = 10, size = 20;
let snake, dir, food, score, best = Number(localStorage.getItem("snake-best") || 0), over, last = 0;
document.getElementById("high-score").textContent = best;
function reset() { snake = [{x: 5, y: 5}]; dir = {x: 1, y: 0}; food = {x: 12, y: 9}; score = 0; over = false; }
const keys = {ArrowUp: [0, -1], ArrowDown: [0, 1], ArrowLeft: [-1, 0], ArrowRight: [1, 0]};
document.addEventListener("keydown", (e) => {
  if (keys[e.key]) { const [x, y] = keys[e.key]; if (x !== -dir.x || y !== -dir.y) dir = {x, y}; }
  if (e.key === " " && over) reset();
});
function step() {
  const head = {x: snake[0].x + dir.x, y: snake[0].y + dir.y};
  const bitten = snake.some((s) => s.x === head.x && s.y === head.y);
  if (head.x < 0 || head.y < 0 || head.x >= size || head.y >= size || bitten) {
    over = true;
    if (score > best) { best = score; localStorage.setItem("snake-best", best); }
    document.getElementById("high-score").textContent = best;
    return;
  }
  snake.unshift(head);
  if (head.x === food.x && head.y === food.y) {
    score += 1; food = {x: (food.x * 7 + 3) % size, y: (food.y * 5 + 1) % size};
  } else snake.pop();
  document.getElementById("score").textContent = score;
}
function loop(t) {
  if (!over && t - last > Math.max(40, 150 - score * 5)) { step(); last = t; }
  g.fillStyle = "#111"; g.fillRect(0, 0, canvas.width, canvas.height);
  g.fillStyle = "#e53935"; g.fillRect(food.x * cell, food.y * cell, cell, cell);
  g.fillStyle = "#43a047"; snake.forEach((s) => g.fillRect(s.x * cell, s.y * cell, cell, cell));
  requestAnimationFrame(loop);
}
reset();
requestAnimationFrame(loop);
""")

GOOD = {"weather_dashboard": WEATHER, "product_page": PRODUCT, "landing_page": LANDING,
        "analytics_dashboard": ANALYTICS, "registration_wizard": REGISTRATION, "snake_game": SNAKE}
