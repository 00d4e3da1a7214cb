#!/usr/bin/python3
"""Drive the Granular Usage page (ui/) in headless Chromium for t/ui*.t.

    drive.py PLAN.json OUT.json

PLAN.json: {"base": "http://127.0.0.1:PORT", "dir": "/tmp/...",
            "steps": [STEP, ...]}
A STEP opens a page or acts on the one open, waits until the page has
settled (its status region is no longer "loading"), and observes it:

    {"name": "...", "url": "/usage-ui/?...",      # open this (optional)
     "size": [1280, 800],                          # window size (optional)
     "select": {"group_by": "project"},            # choose <select> values
     "keys": {"range": "Last 30"},                 # type into a control
     "set": {"start": "2026-11-01T00:00"},         # an input's value
     "click": "#ws-list input[value=\\"ws-a\\"]",   # click (CSS selector)
     "refresh": true, "back": true,                # reload / history back
     "no_load": true,                              # the step loads nothing
     "csv": true,                                  # fetch the CSV link
     "screenshot": "name.png",                     # saved under dir
     "full_page": true,                            # ... the whole page
     "timeout": 30}                                # seconds to settle

OUT.json: {"steps": [OBSERVATION, ...]} with, per step, what the page
shows (status, table, controls, URL, CSV, console log); the .t file holds
the expectations.  Exits non-zero only if the browser cannot be driven.
"""

import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

OBSERVE = r"""
var q = function (s) { return document.querySelector(s); };
var st = q('#status');
var rows = [];
document.querySelectorAll('#totals tbody tr').forEach(function (tr) {
    rows.push({
        group: tr.dataset.group,
        label: tr.querySelector('th').textContent,
        requests: tr.querySelector('.requests').textContent,
        rejected: tr.querySelector('.rejected').textContent,
        tokens: tr.querySelector('.tokens').textContent
    });
});
var foot = q('#totals tfoot tr');
var ws = [];
document.querySelectorAll('#ws-list input').forEach(function (b) {
    ws.push({ id: b.value, checked: b.checked,
              label: b.parentNode.textContent.trim() });
});
var csv = q('#csv');
return {
    search: location.search,
    api_url: q('#api-url').textContent,
    state: st.dataset.state,
    kind: st.dataset.kind || '',
    message: st.textContent,
    result_hidden: q('#result').hidden,
    note: q('#note').textContent,
    rows: rows,
    total: foot ? {
        requests: foot.querySelector('.requests').textContent,
        rejected: foot.querySelector('.rejected').textContent
    } : null,
    bars: document.querySelectorAll('#chart svg rect').length,
    rejected_dots: document.querySelectorAll('#chart svg .rejected-dot')
        .length,
    buckets: document.querySelectorAll('#chart svg g.bucket').length,
    legend: q('#legend').textContent,
    controls: {
        range: q('#range').value, agg: q('#agg').value,
        group_by: q('#group_by').value,
        start: q('#start').value, end: q('#end').value
    },
    workspaces: ws,
    csv_href: csv.href,
    csv_source: csv.dataset.source || '',
    loads: document.body.dataset.loads || '0',
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    unlabelled: Array.prototype.filter.call(
        document.querySelectorAll('select, input, button'),
        function (e) {
            return !(e.labels && e.labels.length) &&
                   !e.getAttribute('aria-label') &&
                   !(e.textContent || '').trim();
        }).length
};
"""

FETCH_CSV = r"""
var done = arguments[arguments.length - 1];
fetch(document.querySelector('#csv').href).then(function (r) {
    return r.text().then(function (t) {
        done({ status: r.status, type: r.headers.get('content-type') || '',
               disposition: r.headers.get('content-disposition') || '',
               download: document.querySelector('#csv').download,
               text: t });
    });
}).catch(function (e) { done({ error: String(e) }); });
"""


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = '/usr/bin/chromium'
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage',
              '--disable-gpu', '--no-first-run', '--disable-extensions',
              '--lang=en-US', '--window-size=1280,800'):
        o.add_argument(a)
    o.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=o)
    d.set_script_timeout(30)
    d.set_page_load_timeout(30)
    return d


def settle(d, before, timeout):
    """Wait until a load newer than `before` has ended; the states seen."""
    seen = []
    end = time.time() + timeout
    while time.time() < end:
        s = d.execute_script(
            "var s = document.querySelector('#status');"
            "return s ? [s.dataset.state, document.body.dataset.loads"
            " || '0'] : ['none', '0'];")
        if not seen or seen[-1] != s[0]:
            seen.append(s[0])
        if s[0] not in ('init', 'loading', 'none') and s[1] != before:
            return seen, True
        time.sleep(0.05)
    return seen, False


def run_step(d, base, out_dir, step):
    obs = {'name': step.get('name', '')}
    timeout = step.get('timeout', 30)

    if 'size' in step:
        d.set_window_size(*step['size'])
        time.sleep(0.3)

    loads = None
    if d.current_url.startswith('http'):
        loads = d.execute_script("return document.body.dataset.loads"
                                 " || '0';")

    if 'url' in step:
        d.get(base + step['url'])
        loads = '0'
    for sel, value in step.get('select', {}).items():
        Select(d.find_element(By.ID, sel)).select_by_value(value)
    for sel, text in step.get('keys', {}).items():
        d.find_element(By.ID, sel).send_keys(text)
    for sel, value in step.get('set', {}).items():
        d.execute_script(
            "var e = document.getElementById(arguments[0]);"
            "e.value = arguments[1];"
            "e.dispatchEvent(new Event('input', {bubbles: true}));"
            "e.dispatchEvent(new Event('change', {bubbles: true}));",
            sel, value)
    if 'click' in step:
        d.find_element(By.CSS_SELECTOR, step['click']).click()
    if step.get('refresh'):
        d.refresh()
        loads = '0'
    if step.get('back'):
        d.back()

    if step.get('no_load'):
        time.sleep(0.5)
        seen, ok = ['none'], True
    else:
        seen, ok = settle(d, loads, timeout)
    obs['settled'] = ok
    obs['states_seen'] = seen
    time.sleep(0.2)     # a resize redraw, a late console message
    obs.update(d.execute_script(OBSERVE))

    if step.get('csv'):
        obs['csv'] = d.execute_async_script(FETCH_CSV)
    if 'screenshot' in step:
        path = out_dir + '/' + step['screenshot']
        if step.get('full_page'):
            w, h = d.get_window_size()['width'], d.get_window_size()['height']
            full = d.execute_script(
                'return document.documentElement.scrollHeight;')
            d.set_window_size(w, full + 140)    # the window's own chrome
            time.sleep(0.5)
            d.save_screenshot(path)
            d.set_window_size(w, h)
        else:
            d.save_screenshot(path)
        obs['screenshot'] = path
    obs['console'] = d.get_log('browser')
    return obs


def main():
    plan = json.load(open(sys.argv[1]))
    d = browser()
    results = []
    try:
        for step in plan['steps']:
            try:
                results.append(run_step(d, plan['base'], plan['dir'], step))
            except Exception as e:      # reported, the next step still runs
                results.append({'name': step.get('name', ''),
                                'exception': repr(e)})
    finally:
        d.quit()
    with open(sys.argv[2], 'w') as f:
        json.dump({'steps': results}, f, indent=1)


if __name__ == '__main__':
    main()
