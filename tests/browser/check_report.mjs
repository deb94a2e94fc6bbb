// Opens a fleetbench HTML report in headless Chromium and prints what a reader would see, as JSON:
// console errors, requests that left the file, and for each chart its size and the data marks drawn.
// Usage: node check_report.mjs REPORT.html   (CHROMIUM overrides /usr/bin/chromium)
import path from 'node:path';
import { chromium } from 'playwright-core';

const file = process.argv[2];
if (!file) {
  console.error('usage: node check_report.mjs REPORT.html');
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
try {
  const page = await browser.newPage();
  const errors = [];
  const requests = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('request', (r) => { if (!r.url().startsWith('file://')) requests.push(r.url()); });
  await page.goto('file://' + path.resolve(file), { waitUntil: 'load' });
  const charts = await page.$$eval('figure.chart', (figs) => figs.map((f) => {
    const svg = f.querySelector('svg');
    const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
    const visible = (e) => { const b = e.getBoundingClientRect(); return b.width > 0 || b.height > 0; };
    // Data: lines through two or more points, and markers; legend swatches are two-point lines too,
    // so the count is compared with the chart's own count of points by the test.
    const lines = svg ? [...svg.querySelectorAll('polyline')]
      .filter((p) => (p.getAttribute('points') || '').trim().split(/\s+/).length >= 2 && visible(p)) : [];
    const markers = svg ? [...svg.querySelectorAll('circle')].filter(visible) : [];
    const linePoints = lines.reduce((n, p) => n + p.getAttribute('points').trim().split(/\s+/).length, 0);
    return {
      id: f.dataset.chart,
      points: Number(f.dataset.points),
      width: box.width,
      height: box.height,
      lines: lines.length,
      line_points: linePoints,
      markers: markers.length,
    };
  }));
  const answer = await page.$eval('.answer', (e) => e.textContent).catch(() => '');
  console.log(JSON.stringify({ title: await page.title(), answer, errors, requests, charts }));
} finally {
  await browser.close();
}
