package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestAuditFindsWritesBehindTheCache: ten tasks and the acme org's stats
// are cached; then a plain SQL UPDATE (not the app: no invalidation)
// changes two of the tasks, and an app POST adds a task to acme, which
// does not touch its TTL-only stats. The audit of the task cache finds
// exactly the two changed tasks, that of org_stats finds acme's stats
// stale, and both show on /metrics and the dashboard's JSON. After the
// app's own PUT of the two tasks, the task audit finds none.
func TestAuditFindsWritesBehindTheCache(t *testing.T) {
	ta := newTestApp(t, nil)
	for id := 1; id <= 10; id++ {
		ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, nil)
	}
	var task Task
	ta.getJSON(t, "/tasks/3", 200, &task)
	ta.getJSON(t, "/orgs/"+task.Org+"/stats", 200, nil)

	ctx := context.Background()
	if _, err := ta.app.store.db.ExecContext(ctx, `UPDATE tasks SET title = title || ' (edited in SQL)' WHERE id IN (3, 7)`); err != nil {
		t.Fatal(err)
	}
	if code, b := ta.do(t, "POST", "/tasks", fmt.Sprintf(`{"org":%q,"title":"one more","status":"todo","assignee_id":%d}`, task.Org, task.Assignee)); code != 201 {
		t.Fatalf("POST = %d %s", code, b)
	}

	var res auditResult
	ta.getJSON(t, "/admin/audit?cache=task&n=1000", 200, &res)
	if res.Sampled != 10 || res.Stale != 2 || len(res.StaleKeys) != 2 {
		t.Fatalf("task audit %+v; want 10 sampled, 2 stale", res)
	}
	for _, k := range res.StaleKeys {
		if !strings.HasSuffix(k, ":3") && !strings.HasSuffix(k, ":7") {
			t.Errorf("%s reported stale", k)
		}
	}
	var stats auditResult
	ta.getJSON(t, "/admin/audit?cache=org_stats", 200, &stats)
	if stats.Sampled != 1 || stats.Stale != 1 {
		t.Fatalf("org_stats audit %+v; want its one entry stale (TTL only)", stats)
	}

	_, metrics := ta.do(t, "GET", "/metrics", "")
	for _, line := range []string{`taskservice_audit_stale{cache="task"} 2`, `taskservice_audit_sampled{cache="task"} 10`, `taskservice_audit_stale{cache="org_stats"} 1`} {
		if !strings.Contains(string(metrics), line) {
			t.Errorf("/metrics lacks %q", line)
		}
	}
	var dash dashboardJSON
	ta.getJSON(t, "/admin/dashboard.json", 200, &dash)
	if len(dash.Audits) != 2 || dash.Audits[0].Cache != "task" || dash.Audits[0].Stale != 2 {
		t.Errorf("dashboard audits %+v", dash.Audits)
	}

	for _, id := range []int{3, 7} {
		ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, &task)
		if code, b := ta.do(t, "PUT", fmt.Sprintf("/tasks/%d", id), fmt.Sprintf(`{"title":%q,"status":%q,"assignee_id":%d}`, task.Title, task.Status, task.Assignee)); code != 200 {
			t.Fatalf("PUT = %d %s", code, b)
		}
	}
	ta.getJSON(t, "/admin/audit?cache=task&n=1000", 200, &res)
	if res.Stale != 0 {
		t.Fatalf("after the app's own writes: %+v; want none stale", res)
	}
	ta.getJSON(t, "/admin/audit?cache=nope", 400, nil)
	ta.getJSON(t, "/admin/audit?cache=task&n=0", 400, nil)
}

// TestWriterDiesAfterCommit: a PUT whose process "dies" right after its
// commit (it never invalidates) leaves the old task in the cache, and the
// audit finds it stale; the outbox row the PUT recorded in its own
// transaction is applied by the relay after its grace, and then the task
// and its org's list pages show the new title, and the audit finds
// nothing stale. A PUT that invalidates itself deletes its row (the fast
// path), leaving the relay nothing.
func TestWriterDiesAfterCommit(t *testing.T) {
	old := outboxGrace
	outboxGrace = 300 * time.Millisecond
	t.Cleanup(func() { outboxGrace = old })
	ta := newTestApp(t, nil)
	var task Task
	ta.getJSON(t, "/tasks/5", 200, &task)
	put := func(title string) {
		t.Helper()
		if code, b := ta.do(t, "PUT", "/tasks/5", fmt.Sprintf(`{"title":%q,"status":%q,"assignee_id":%d}`, title, task.Status, task.Assignee)); code != 200 {
			t.Fatalf("PUT = %d %s", code, b)
		}
	}
	ta.app.svc.crashAfterCommit.Store(true)
	put("written, then the writer died")
	ta.app.svc.crashAfterCommit.Store(false)
	var got Task
	ta.getJSON(t, "/tasks/5", 200, &got)
	if got.Title != task.Title {
		t.Fatalf("right after the dead writer's commit the cache served %q; the test needs the old title still cached", got.Title)
	}
	var res auditResult
	ta.getJSON(t, "/admin/audit?cache=task", 200, &res)
	if res.Stale != 1 {
		t.Fatalf("audit before the relay: %+v; want the one stale task", res)
	}
	deadline := time.Now().Add(10 * time.Second)
	for got.Title != "written, then the writer died" {
		if time.Now().After(deadline) {
			t.Fatalf("10s after the commit the task still reads %q: the relay never applied the outbox row", got.Title)
		}
		time.Sleep(50 * time.Millisecond)
		ta.getJSON(t, "/tasks/5", 200, &got)
	}
	outboxRows := func() int {
		var n int
		if err := ta.app.store.db.QueryRow(`SELECT COUNT(*) FROM cacheaside_outbox`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for outboxRows() != 0 { // the org's and assignee's tag rows too
		if time.Now().After(deadline) {
			t.Fatalf("%d outbox rows left", outboxRows())
		}
		time.Sleep(20 * time.Millisecond)
	}
	ta.getJSON(t, "/admin/audit?cache=task", 200, &res)
	if res.Stale != 0 {
		t.Fatalf("audit after the relay: %+v; want nothing stale", res)
	}

	put("written and invalidated by its writer")
	if n := outboxRows(); n != 0 {
		t.Fatalf("%d outbox rows after a write that invalidated itself; want 0 (Done)", n)
	}
}
