package main

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/url"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox/pgtest"
)

// TestCDCInvalidatesWritesFromOutside runs the app on a PostgreSQL with
// wal_level=logical (its own, started by the test: CACHEASIDE_PG_LOGICAL=1)
// and writes to it from a plain SQL connection, as psql or another service
// would: an UPDATE of one task, a conditional UPDATE … WHERE of every task
// of an org, and a task moved between orgs. Each reaches the cache through
// the change data capture listener; the audit then finds nothing stale.
// With CDC=off the same app starts no listener.
func TestCDCInvalidatesWritesFromOutside(t *testing.T) {
	conn := pgtest.StartLogical(t)
	ta := newTestApp(t, func(e *env) { e.databaseURL = conn })
	if ta.app.cdc == nil {
		t.Fatal("no change data capture on a database with wal_level=logical")
	}
	db, err := sql.Open("pgx", conn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var task Task
	ta.getJSON(t, "/tasks/5", 200, &task)
	eventually := func(what string, done func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !done() {
			if time.Since(start) > 10*time.Second {
				t.Fatalf("%s: not seen through the cache 10s after the commit", what)
			}
			time.Sleep(2 * time.Millisecond)
		}
		return time.Since(start)
	}
	if _, err := db.Exec(`UPDATE tasks SET title = 'written by psql' WHERE id = 5`); err != nil {
		t.Fatal(err)
	}
	took := eventually("an UPDATE from outside the app", func() bool {
		var got Task
		ta.getJSON(t, "/tasks/5", 200, &got)
		return got.Title == "written by psql"
	})
	t.Logf("an UPDATE from a plain SQL connection read back through the cache after %v", took.Round(time.Millisecond))

	var ids []int64
	rows, err := db.Query(`SELECT id FROM tasks WHERE org = $1 ORDER BY id LIMIT 20`, task.Org)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		_ = rows.Scan(&id)
		ids = append(ids, id)
	}
	rows.Close()
	for _, id := range ids {
		ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, &Task{})
	}
	var page TaskPage
	ta.getJSON(t, "/tasks?org="+url.QueryEscape(task.Org), 200, &page)
	if _, err := db.Exec(`UPDATE tasks SET title = title || ' (bulk)' WHERE org = $1`, task.Org); err != nil {
		t.Fatal(err)
	}
	eventually("a conditional UPDATE of an org's tasks", func() bool {
		for _, id := range ids {
			var got Task
			ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, &got)
			if !strings.HasSuffix(got.Title, " (bulk)") {
				return false
			}
		}
		var p TaskPage
		ta.getJSON(t, "/tasks?org="+url.QueryEscape(task.Org), 200, &p)
		return len(p.Tasks) > 0 && strings.HasSuffix(p.Tasks[0].Title, " (bulk)")
	})

	var other string
	if err := db.QueryRow(`SELECT slug FROM orgs WHERE slug <> $1 LIMIT 1`, task.Org).Scan(&other); err != nil {
		t.Fatal(err)
	}
	var before TaskPage
	ta.getJSON(t, "/tasks?org="+url.QueryEscape(other), 200, &before)
	if _, err := db.Exec(`UPDATE tasks SET org = $1 WHERE id = 5`, other); err != nil {
		t.Fatal(err)
	}
	eventually("a task moved to another org: the new org's list", func() bool {
		var p TaskPage
		ta.getJSON(t, "/tasks?org="+url.QueryEscape(other), 200, &p)
		return p.Total == before.Total+1
	})
	// A writer that dies after its commit, before its own invalidation:
	// the change stream applies it well before the outbox's relay would
	// (its grace is 2s).
	ta.getJSON(t, "/tasks/7", 200, &task)
	ta.app.svc.crashAfterCommit.Store(true)
	if code, b := ta.do(t, "PUT", "/tasks/7", fmt.Sprintf(`{"title":"written, then the writer died","status":%q,"assignee_id":%d}`, task.Status, task.Assignee)); code != 200 {
		t.Fatalf("PUT = %d %s", code, b)
	}
	ta.app.svc.crashAfterCommit.Store(false)
	took = eventually("a write whose writer died after its commit", func() bool {
		var got Task
		ta.getJSON(t, "/tasks/7", 200, &got)
		return got.Title == "written, then the writer died"
	})
	if took >= outboxGrace {
		t.Errorf("the dead writer's task was served fresh only after %v, the relay's grace: the change stream did not apply it", took)
	}
	var res auditResult
	ta.getJSON(t, "/admin/audit?cache=task", 200, &res)
	if res.Stale != 0 || res.Sampled == 0 {
		t.Fatalf("audit after writes from outside the app: %+v; want nothing stale", res)
	}
	if _, b := ta.do(t, "GET", "/metrics", ""); !strings.Contains(string(b), "taskservice_cdc_applied_total") {
		t.Fatal("/metrics has no taskservice_cdc_applied_total")
	}

	off := newTestApp(t, func(e *env) { e.databaseURL, e.cdc = conn, "off" })
	if off.app.cdc != nil {
		t.Fatal("CDC=off started a listener")
	}
}

// TestDemoPart46 runs the demo's part 4.6 on a PostgreSQL with
// wal_level=logical: it writes with plain SQL and reports how soon the app
// served the new title, with nothing stale in the audit. (TestDemo runs
// the whole demo, where part 4.6 says why it did not run.)
func TestDemoPart46(t *testing.T) {
	conn := pgtest.StartLogical(t)
	ta := newTestApp(t, func(e *env) { e.databaseURL = conn })
	var out bytes.Buffer
	d := demo{out: &out, progressOut: io.Discard, app: ta.app, queries: new(atomic.Int64), redisName: "the test's"}
	if err := d.part46(context.Background()); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`served the new title (\S+) after the commit[\s\S]*Audit: 0 stale of [1-9]\d* sampled`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("part 4.6 missing or stale:\n%s", out.String())
	}
	t.Logf("part 4.6: a write from outside the app served after %s", m[1])
}

// TestDemoPart54 runs the demo's part 5.4: with the soft load timeout the
// requests for stats past their TTL get the old figures before the slow
// reload returns, with one query; without it they wait for the reload.
func TestDemoPart54(t *testing.T) {
	ta := newTestApp(t, nil)
	var out bytes.Buffer
	d := demo{out: &out, progressOut: io.Discard, app: ta.app, queries: new(atomic.Int64), redisName: "the test's"}
	if err := d.part54(context.Background()); err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`SoftLoadTimeout 100ms\s+(\S+)\s+(\S+)\s+50 of 50\s+1\s+\S+\s*\nno SoftLoadTimeout\s+(\S+)\s+\S+\s+0 of 50\s+1\s`)
	m := re.FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("part 5.4's table is not as expected:\n%s", out.String())
	}
	for _, s := range m[1:] {
		if _, err := time.ParseDuration(s); err != nil {
			t.Fatalf("%q in part 5.4's table: %v\n%s", s, err, out.String())
		}
	}
	soft, _ := time.ParseDuration(m[2])
	plain, _ := time.ParseDuration(m[3])
	if soft >= time.Second || plain < time.Second {
		t.Fatalf("with the soft timeout the slowest request took %v, without it the median %v; want under and over the 1s reload:\n%s", soft, plain, out.String())
	}
	t.Logf("\n%s", out.String())
}
