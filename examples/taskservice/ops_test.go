package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside/cachetest"
)

// With ADMIN_TOKEN set, operator endpoints need it; the API does not.
func TestAdminToken(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.adminToken = "s3cret" })
	for _, path := range []string{"/admin/cache-stats", "/metrics"} {
		for _, auth := range []string{"", "Bearer wrong", "Bearer s3cret2", "s3cret", "Basic czNjcmV0"} {
			req, _ := http.NewRequest("GET", ta.srv.URL+path, nil)
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != 401 || res.Header.Get("WWW-Authenticate") == "" {
				t.Fatalf("GET %s with %q = %d, want 401 with WWW-Authenticate", path, auth, res.StatusCode)
			}
		}
		req, _ := http.NewRequest("GET", ta.srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer s3cret")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			t.Fatalf("GET %s with the token = %d", path, res.StatusCode)
		}
	}
	ta.getJSON(t, "/tasks/42", 200, nil)
	ta.getJSON(t, "/healthz", 200, nil)
}

// /healthz reports states, never error strings.
func TestHealthStates(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.redisURL = "" })
	cachetest.WaitLocal(t, ta.svc.tasks) // until then /healthz says "bypassed", rightly
	var h health
	ta.getJSON(t, "/healthz", 200, &h)
	if h != (health{Status: "ok", Database: "up", Redis: "up", Breaker: "closed", LocalTier: "live"}) {
		t.Fatalf("healthz = %+v", h)
	}
	ta.mini.Close()
	for range 10 {
		ta.getJSON(t, "/tasks/42", 200, nil)
	}
	// The breaker opens within those requests; the local tier is bypassed
	// once its subscriber has seen the connection go, which on a busy
	// machine may come after them.
	var b []byte
	for deadline := time.Now().Add(10 * time.Second); ; {
		var code int
		code, b = ta.do(t, "GET", "/healthz", "")
		if err := json.Unmarshal(b, &h); err != nil || code != 200 {
			t.Fatal(code, err)
		}
		if h.Status != "degraded" || h.Redis != "down" || h.Breaker != "open" {
			t.Fatalf("healthz with Redis gone = %s", b)
		}
		if h.LocalTier == "bypassed" {
			break
		}
		if h.LocalTier != "live" || time.Now().After(deadline) {
			t.Fatalf("healthz with Redis gone = %s; want the local tier bypassed", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, leak := range []string{"dial", "refused", "127.0.0.1", "tcp"} {
		if strings.Contains(string(b), leak) {
			t.Fatalf("healthz leaks %q: %s", leak, b)
		}
	}
}

// Two instances started at once on an empty database: both come up, and
// the seed is written once.
func TestConcurrentStartEmptyDatabase(t *testing.T) {
	for round := range 3 {
		e := env{}
		if base := os.Getenv("DATABASE_URL"); base != "" {
			e.databaseURL, _ = pgSchema(t, base)
		} else {
			e.databaseURL = "sqlite:" + filepath.Join(t.TempDir(), "tasks.db")
		}
		var wg sync.WaitGroup
		apps := make([]*app, 2)
		errs := make([]error, 2)
		for i := range apps {
			wg.Go(func() {
				apps[i], errs[i] = newApp(context.Background(), e, slog.New(slog.DiscardHandler), 0, fmt.Sprintf("start%d.%d.", round, i))
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: instance %d: %v", round, i, err)
			}
			defer apps[i].Close()
		}
		var orgs, tasks int
		db := apps[0].store.db
		if err := db.QueryRow(`SELECT COUNT(*) FROM orgs`).Scan(&orgs); err != nil {
			t.Fatal(err)
		}
		if err := db.QueryRow(`SELECT COUNT(*) FROM tasks`).Scan(&tasks); err != nil {
			t.Fatal(err)
		}
		if orgs != 3 || tasks != 1000 {
			t.Fatalf("round %d: %d orgs, %d tasks; want one seed (3, 1000)", round, orgs, tasks)
		}
	}
}

// DELETE /admin/cache/{cache}?prefix= drops one cache's entries under a
// prefix of its keyspace, and refuses anything else; the lists' invalidation
// endpoint drops an org's list pages in one step.
func TestPurgeEndpoints(t *testing.T) {
	ta := newTestApp(t, nil)
	for id := 1; id <= 5; id++ {
		ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, nil)
	}
	ta.getJSON(t, "/tasks?org=acme&page=1", 200, nil)
	before := ta.queries.Load()
	prefix := "v1:" + ta.prefix + "tasks:"
	code, b := ta.do(t, "DELETE", "/admin/cache/task?prefix="+url.QueryEscape(prefix), "")
	var res PurgeResult
	if err := json.Unmarshal(b, &res); code != 200 || err != nil || res.Deleted != 5 {
		t.Fatalf("purge = %d %s, want 5 deleted", code, b)
	}
	for id := 1; id <= 5; id++ {
		ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, nil)
	}
	if n := ta.queries.Load() - before; n != 5 {
		t.Fatalf("%d queries after the purge, want 5 (every task reloaded)", n)
	}
	ta.getJSON(t, "/tasks?org=acme&page=1", 200, nil)
	if n := ta.queries.Load() - before; n != 5 {
		t.Fatal("the task purge dropped list pages too")
	}
	for _, bad := range []string{
		"/admin/cache/nope?prefix=" + url.QueryEscape(prefix),
		"/admin/cache/task",
		"/admin/cache/task?prefix=v1:",
		"/admin/cache/task?prefix=" + url.QueryEscape("v1:"+ta.prefix+"task_lists:"),
		"/admin/cache/task?prefix=" + url.QueryEscape(ta.prefix+"tasks:"),
		"/admin/cache/task?prefix=" + url.QueryEscape(prefix) + "&all=1",
	} {
		if code, b := ta.do(t, "DELETE", bad, ""); code != 400 {
			t.Errorf("DELETE %s = %d %s, want 400", bad, code, b)
		}
	}
	if code, b := ta.do(t, "POST", "/admin/orgs/acme/lists/invalidate", ""); code != 200 {
		t.Fatalf("lists' invalidation = %d %s", code, b)
	}
	ta.getJSON(t, "/tasks?org=acme&page=1", 200, nil)
	if n := ta.queries.Load() - before; n != 6 {
		t.Fatalf("%d queries, want the list page reloaded after the invalidation", n)
	}
}

// The task cache's lifetimes come from the task (Options.Lifetime): a
// finished task keeps the table's 5 minutes, an open one 2.
func TestTaskLifetimeFromStatus(t *testing.T) {
	ta := newTestApp(t, nil)
	ctx := context.Background()
	for _, c := range []struct {
		status string
		want   time.Duration
	}{{"done", 5 * time.Minute}, {"todo", openTaskTTL}, {"doing", openTaskTTL}} {
		var id int64
		if err := ta.store.db.QueryRow(`SELECT MIN(id) FROM tasks WHERE status = '` + c.status + `'`).Scan(&id); err != nil {
			t.Fatal(err)
		}
		var task Task
		ta.getJSON(t, fmt.Sprintf("/tasks/%d", id), 200, &task)
		if task.Status != c.status {
			t.Fatalf("task %d is %q, want %q", id, task.Status, c.status)
		}
		p, err := ta.svc.tasks.Peek(ctx, ta.svc.taskKey(id))
		if err != nil || p.State != "fresh" {
			t.Fatalf("Peek task %d = %+v, %v", id, p, err)
		}
		// The Policy's 10% jitter shortens it by up to a tenth.
		if left := time.Until(p.Expires); left > c.want || left < c.want*9/10-time.Second {
			t.Fatalf("a %s task is fresh for %v more, want %v less up to 10%%", c.status, left, c.want)
		}
	}
}

// List pages carry tags (Options.Tags): a write to a task reloads its
// org's pages of all tasks and its assignees' pages (before and after),
// and leaves every other assignee's pages cached.
func TestListTags(t *testing.T) {
	ta := newTestApp(t, nil)
	var task Task
	ta.getJSON(t, "/tasks/1", 200, &task)
	if task.Org != "acme" {
		t.Fatalf("task 1 is of org %q", task.Org)
	}
	var others []int64 // acme's users are 1 to 4
	for u := int64(1); u <= 4; u++ {
		if u != task.Assignee {
			others = append(others, u)
		}
	}
	b, c := others[0], others[1]
	pages := map[string]string{
		"org": "/tasks?org=acme",
		"a":   fmt.Sprintf("/tasks?org=acme&assignee=%d", task.Assignee),
		"b":   fmt.Sprintf("/tasks?org=acme&assignee=%d", b),
		"c":   fmt.Sprintf("/tasks?org=acme&assignee=%d", c),
	}
	// reloaded reads every page and returns the ones that queried the
	// database.
	reloaded := func() []string {
		t.Helper()
		var got []string
		for _, name := range []string{"org", "a", "b", "c"} {
			before := ta.queries.Load()
			var p TaskPage
			ta.getJSON(t, pages[name], 200, &p)
			for _, tk := range p.Tasks {
				if name != "org" && tk.Assignee != p.Assignee {
					t.Fatalf("page %s lists task %d of assignee %d", pages[name], tk.ID, tk.Assignee)
				}
			}
			if ta.queries.Load() != before {
				got = append(got, name)
			}
		}
		return got
	}
	expect := func(what string, want ...string) {
		t.Helper()
		if got := reloaded(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("%s: pages reloaded %v, want %v", what, got, want)
		}
	}
	expect("first reads", "org", "a", "b", "c")
	expect("cached")
	update := func(status string, assignee int64) {
		t.Helper()
		if code, body := ta.do(t, "PUT", "/tasks/1", fmt.Sprintf(`{"title":%q,"status":%q,"assignee_id":%d}`, task.Title, status, assignee)); code != 200 {
			t.Fatalf("PUT = %d %s", code, body)
		}
	}
	status := "done"
	if task.Status == "done" {
		status = "todo"
	}
	update(status, task.Assignee)
	expect("after a status change", "org", "a")
	update(status, b)
	expect("after a reassignment from a to b", "org", "a", "b")
	if code, body := ta.do(t, "POST", "/admin/orgs/acme/lists/invalidate", ""); code != 200 {
		t.Fatalf("lists' invalidation = %d %s", code, body)
	}
	expect("after the org's lists were invalidated", "org", "a", "b", "c")
}
