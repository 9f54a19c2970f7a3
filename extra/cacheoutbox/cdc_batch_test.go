package cacheoutbox

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox/pgtest"
)

// itemsDB starts a logical PostgreSQL with a published table items of n
// rows and the listener's slot, and returns its connection string and a
// pool on it.
func itemsDB(tb testing.TB, n int) (string, *sql.DB) {
	tb.Helper()
	conn := pgtest.StartLogical(tb)
	db, err := sql.Open("pgx", conn)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = db.Close() })
	for _, q := range []string{
		`CREATE TABLE items (id INT PRIMARY KEY, n INT NOT NULL)`,
		fmt.Sprintf(`INSERT INTO items SELECT g, 0 FROM generate_series(1, %d) g`, n),
		`CREATE PUBLICATION cacheaside FOR TABLE items`,
		`SELECT pg_create_logical_replication_slot('cacheaside', 'pgoutput')`,
	} {
		if _, err := db.Exec(q); err != nil {
			tb.Fatalf("%s: %v", q, err)
		}
	}
	return conn, db
}

// fillItems writes keys name:1 … name:n and returns a function that says
// how many of them are still in Redis.
func fillItems(tb testing.TB, c *cacheaside.Cache[string], addr, name string, n int) func() int {
	tb.Helper()
	ctx := context.Background()
	for i := 1; i <= n; i++ {
		if err := c.Set(ctx, name+":"+strconv.Itoa(i), "0"); err != nil {
			tb.Fatal(err)
		}
	}
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	tb.Cleanup(func() { _ = rdb.Close() })
	keys := make([]string, n)
	for i := range keys {
		keys[i] = name + ":" + strconv.Itoa(i+1)
	}
	return func() int {
		left := 0
		for i := 0; i < n; i += 1000 {
			k, err := rdb.Exists(ctx, keys[i:min(i+1000, n)]...).Result()
			if err != nil {
				tb.Fatal(err)
			}
			left += int(k)
		}
		return left
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestListenerBatchesAndSlot: a conditional UPDATE of 5,000 rows, one
// transaction, is applied in batches of Batch (500) as its changes arrive,
// and every row's key is invalidated; a rolled-back UPDATE applies nothing. With the listener stopped, CheckSlot
// reports the WAL its slot retains and warns past the limit; the listener
// warns when it resumes, and its lag in bytes falls to 0 once it caught up.
func TestListenerBatchesAndSlot(t *testing.T) {
	const rows = 5000
	conn, db := itemsDB(t, rows)
	ctx := context.Background()
	addr, _ := redisAddr(t)
	name := "item" + unique()
	c := newCache(t, addr, name, cacheaside.Degradation{})
	left := fillItems(t, c, addr, name, rows)
	s, err := CheckSlot(ctx, conn, "cacheaside", 256<<10)
	if err != nil || !s.Exists || s.Active || s.Warn != "" || s.KeepSize != "1GB" {
		t.Fatalf("a new slot: %+v, %v", s, err)
	}
	var logs syncBuffer
	run := func() (*Listener, func()) {
		l, err := NewListener(ListenerOptions{Conn: conn, Tables: []Table{itemsTable(name)}, Batch: 500, RetainWarn: 256 << 10,
			Logger: slog.New(slog.NewTextHandler(&logs, nil))}, c)
		if err != nil {
			t.Fatal(err)
		}
		lctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = l.Run(lctx) }()
		return l, func() { cancel(); <-done }
	}
	l, stop := run()
	if _, err := db.Exec(`UPDATE items SET n = n + 1 WHERE id % 1 = 0`); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "every row of the 5,000-row UPDATE invalidated", func() bool { return left() == 0 })
	waitUntil(t, "the transaction confirmed", func() bool { return l.Stats().Transactions >= 1 })
	if st := l.Stats(); st.Batches < rows/500 || st.Applied < rows {
		t.Fatalf("stats %+v: want the 5,000 targets applied in at least %d batches", st, rows/500)
	}

	// A rolled-back UPDATE applies nothing: PostgreSQL decodes only
	// committed transactions. Row 2's key, filled again, survives the
	// commit that follows it, whose key is invalidated.
	if err := c.Set(ctx, name+":1", "0"); err != nil {
		t.Fatal(err)
	}
	if err := c.Set(ctx, name+":2", "0"); err != nil {
		t.Fatal(err)
	}
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`UPDATE items SET n = n + 1 WHERE id = 2`); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE items SET n = n + 1 WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	exists := func(k string) bool {
		_, err := c.Get(ctx, k, func(context.Context) (string, error) { return "", cacheaside.ErrNotFound })
		return err == nil
	}
	waitUntil(t, "the committed UPDATE's key invalidated", func() bool { return !exists(name + ":1") })
	if !exists(name + ":2") {
		t.Fatal("a rolled-back UPDATE invalidated its row's key")
	}
	stop()

	for range 4 { // WAL the stopped slot holds back
		if _, err := db.Exec(`UPDATE items SET n = n + 1`); err != nil {
			t.Fatal(err)
		}
	}
	s, err = CheckSlot(ctx, conn, "cacheaside", 256<<10)
	if err != nil || s.Active || s.Retained <= 256<<10 || !strings.Contains(s.Warn, "retaining") {
		t.Fatalf("a stopped slot behind 4 UPDATEs of 5,000 rows: %+v, %v", s, err)
	}
	t.Logf("stopped slot: %+v", s)
	l, stop = run()
	defer stop()
	waitUntil(t, "the warning of a resumed slot", func() bool { return strings.Contains(logs.String(), "retaining") })
	waitUntil(t, "the backlog applied and confirmed", func() bool { st := l.Stats(); return st.Transactions >= 4 && st.LagBytes == 0 })
	t.Logf("caught up: %+v", l.Stats())
}

func waitUntil(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkListener: how fast a listener applies a backlog of row changes
// (written while it was stopped), from its start to the last target
// applied: 20,000 rows changed in transactions of 100 rows, and 5,000
// single-row transactions. Run with CACHEASIDE_PG_LOGICAL=1.
func BenchmarkListener(b *testing.B) {
	for _, bc := range []struct {
		name      string
		rows, per int
	}{{"txn100", 20_000, 100}, {"txn1", 5_000, 1}} {
		b.Run(bc.name, func(b *testing.B) {
			conn, db := itemsDB(b, bc.rows)
			ctx := context.Background()
			addr, _ := redisAddr(b)
			name := "item" + unique()
			c := newCache(b, addr, name, cacheaside.Degradation{})
			var total time.Duration
			applied := 0
			for b.Loop() {
				b.StopTimer()
				for i := 1; i <= bc.rows; i += bc.per {
					if _, err := db.Exec(`UPDATE items SET n = n + 1 WHERE id >= $1 AND id < $2`, i, i+bc.per); err != nil {
						b.Fatal(err)
					}
				}
				l, err := NewListener(ListenerOptions{Conn: conn, Tables: []Table{itemsTable(name)}, Logger: slog.New(slog.DiscardHandler)}, c)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				start := time.Now()
				lctx, cancel := context.WithCancel(ctx)
				done := make(chan struct{})
				go func() { defer close(done); _ = l.Run(lctx) }()
				for l.Stats().Transactions < uint64(bc.rows/bc.per) {
					time.Sleep(time.Millisecond)
				}
				total += time.Since(start)
				applied += int(l.Stats().Applied)
				b.StopTimer()
				cancel()
				<-done
				b.StartTimer()
			}
			b.ReportMetric(float64(applied)/total.Seconds(), "invalidations/s")
		})
	}
}
