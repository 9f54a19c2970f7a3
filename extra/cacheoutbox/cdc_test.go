package cacheoutbox

import (
	"context"
	"database/sql"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox/pgtest"
)

// timedCache records when each key was invalidated.
type timedCache struct {
	Invalidator
	mu   sync.Mutex
	when map[string][]time.Time
}

func (c *timedCache) InvalidatePrefix(ctx context.Context, prefix string) (int64, error) {
	n, err := c.Invalidator.InvalidatePrefix(ctx, prefix)
	if err == nil {
		c.mu.Lock()
		c.when["prefix "+prefix] = append(c.when["prefix "+prefix], time.Now())
		c.mu.Unlock()
	}
	return n, err
}

func (c *timedCache) Invalidate(ctx context.Context, keys ...string) (int64, error) {
	n, err := c.Invalidator.Invalidate(ctx, keys...)
	if err == nil {
		now := time.Now()
		c.mu.Lock()
		for _, k := range keys {
			c.when[k] = append(c.when[k], now)
		}
		c.mu.Unlock()
	}
	return n, err
}

// TestListenerInvalidatesWritesFromElsewhere: 1,000 single-row UPDATEs
// from a plain SQL connection (not through any outbox), at about 200 a
// second, with the listener killed (its context cancelled) and started
// again three times along the way: every changed row's key is
// invalidated, and the commit-to-invalidated latency is reported. Then a
// conditional UPDATE … WHERE touching 500 rows invalidates each of them,
// a task moved to another org clears both orgs' namespaces (old and new
// values), and a TRUNCATE applies the table's Truncate targets.
func TestListenerInvalidatesWritesFromElsewhere(t *testing.T) {
	conn := pgtest.StartLogical(t)
	ctx := context.Background()
	db, err := sql.Open("pgx", conn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	for _, q := range []string{
		`CREATE TABLE tasks (id INT PRIMARY KEY, org TEXT NOT NULL, title TEXT NOT NULL)`,
		`ALTER TABLE tasks REPLICA IDENTITY FULL`,
		`INSERT INTO tasks SELECT g, 'org' || (g % 3), 'title ' || g FROM generate_series(1, 1000) g`,
		`CREATE PUBLICATION cacheaside FOR TABLE tasks`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	addr, _ := redisAddr(t)
	name := "task" + unique()
	tc := &timedCache{Invalidator: newCache(t, addr, name, cacheaside.Degradation{}), when: map[string][]time.Time{}}
	key := func(id string) string { return "v1:task:" + id }
	table := Table{Name: "public.tasks",
		Targets: func(c Change) []Target {
			var ts []Target
			if c.New["title"] == "poison" { // a key the cache refuses: dropped, and the stream goes on
				return []Target{{Cache: name, Key: strings.Repeat("k", 1100)}}
			}
			for _, r := range []Row{c.Old, c.New} {
				if r != nil {
					ts = append(ts, Target{Cache: name, Key: key(r["id"])}, Target{Cache: name, Prefix: "v1:list:" + r["org"] + ":"})
				}
			}
			return ts
		},
		Truncate: []Target{{Cache: name, Prefix: "v1:"}},
	}
	var last *Listener
	start := func() (stop func()) {
		l, err := NewListener(ListenerOptions{Conn: conn, Tables: []Table{table}}, tc)
		if err != nil {
			t.Fatal(err)
		}
		last = l
		lctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = l.Run(lctx) }()
		return func() { cancel(); <-done }
	}
	stop := start()
	// The slot must exist before the writes it is to see (in production it
	// is made once, before the application writes).
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := db.QueryRow(`SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cacheaside'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the listener never made its slot")
		}
		time.Sleep(10 * time.Millisecond)
	}

	const updates = 1000
	commits := make([]time.Time, updates+1)
	for i := 1; i <= updates; i++ {
		if _, err := db.Exec(`UPDATE tasks SET title = title || '.' WHERE id = $1`, i); err != nil {
			t.Fatal(err)
		}
		commits[i] = time.Now()
		if i%250 == 0 { // killed and started again
			stop()
			stop = start()
		}
		time.Sleep(5 * time.Millisecond)
	}
	waitAll := func(what string, ids []int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			tc.mu.Lock()
			missing := 0
			for _, id := range ids {
				if len(tc.when[key(strconv.Itoa(id))]) == 0 {
					missing++
				}
			}
			tc.mu.Unlock()
			if missing == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d of %d keys never invalidated", what, missing, len(ids))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	ids := make([]int, updates)
	for i := range ids {
		ids[i] = i + 1
	}
	waitAll("single-row UPDATEs", ids)
	tc.mu.Lock()
	var lat []time.Duration
	dups := 0
	for i := 1; i <= updates; i++ {
		w := tc.when[key(strconv.Itoa(i))]
		dups += len(w) - 1
		lat = append(lat, max(w[0].Sub(commits[i]), 0))
	}
	tc.mu.Unlock()
	slices.Sort(lat)
	t.Logf("%d UPDATEs, listener restarted 4 times: commit to invalidated p50 %v, p99 %v, max %v; %d keys invalidated more than once",
		updates, lat[len(lat)/2].Round(time.Microsecond), lat[len(lat)*99/100].Round(time.Microsecond), lat[len(lat)-1].Round(time.Microsecond), dups)

	tc.mu.Lock()
	clear(tc.when)
	tc.mu.Unlock()
	if _, err := db.Exec(`UPDATE tasks SET title = 'bulk' WHERE id % 2 = 0 AND id <= 1000`); err != nil {
		t.Fatal(err)
	}
	var even []int
	for i := 2; i <= 1000; i += 2 {
		even = append(even, i)
	}
	waitAll("a conditional UPDATE of 500 rows", even)

	seen := func(what, k string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			tc.mu.Lock()
			n := len(tc.when[k])
			tc.mu.Unlock()
			if n > 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s never invalidated", what, k)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// A second listener waits on the slot the first one holds, and takes
	// over when the first one's connection ends.
	stop2 := start()
	defer stop2()
	time.Sleep(300 * time.Millisecond)
	stop()
	tc.mu.Lock()
	clear(tc.when)
	tc.mu.Unlock()
	if _, err := db.Exec(`UPDATE tasks SET org = 'org9' WHERE id = 3`); err != nil { // org0 to org9
		t.Fatal(err)
	}
	seen("a task moved between orgs, after the takeover", "prefix v1:list:org0:")
	seen("a task moved between orgs, after the takeover", "prefix v1:list:org9:")
	if _, err := db.Exec(`UPDATE tasks SET title = 'poison' WHERE id = 4`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE tasks SET title = 'after the poison' WHERE id = 5`); err != nil {
		t.Fatal(err)
	}
	seen("a change after one that can never be applied", key("5"))
	if d := last.Stats().Dropped; d != 1 {
		t.Errorf("Dropped %d, want the poison change's 1", d)
	}
	if _, err := db.Exec(`TRUNCATE tasks`); err != nil {
		t.Fatal(err)
	}
	seen("TRUNCATE", "prefix v1:")
}
