package cacheoutbox

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/redis/go-redis/v9"
	_ "modernc.org/sqlite"

	"github.com/seed-b4ec662f/cacheaside"
)

// database is one database the tests run on: SQLite always, and the
// PostgreSQL of DATABASE_URL when it is set (each test in a schema of its
// own).
type database struct {
	name string
	d    Dialect
	db   *sql.DB
}

func unique() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func forEachDB(t *testing.T, f func(t *testing.T, db database)) {
	t.Helper()
	t.Run("sqlite", func(t *testing.T) { f(t, openSQLite(t)) })
	if os.Getenv("DATABASE_URL") != "" {
		t.Run("postgres", func(t *testing.T) { f(t, openPostgres(t)) })
	}
}

// openDBs opens every database the tests run on.
func openDBs(tb testing.TB) []database {
	dbs := []database{openSQLite(tb)}
	if os.Getenv("DATABASE_URL") != "" {
		dbs = append(dbs, openPostgres(tb))
	}
	return dbs
}

func openSQLite(tb testing.TB) database {
	path := filepath.Join(tb.TempDir(), "outbox.db")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = db.Close() })
	return database{"sqlite", SQLite, db}
}

// openPostgres opens DATABASE_URL in a new schema, dropped at cleanup.
func openPostgres(tb testing.TB) database {
	base := os.Getenv("DATABASE_URL")
	admin, err := sql.Open("pgx", base)
	if err != nil {
		tb.Fatal(err)
	}
	defer admin.Close()
	schema := "outbox_" + unique()
	if _, err := admin.Exec("CREATE SCHEMA " + schema); err != nil {
		tb.Fatalf("DATABASE_URL is set but PostgreSQL refused: %v", err)
	}
	tb.Cleanup(func() {
		a, err := sql.Open("pgx", base)
		if err == nil {
			_, _ = a.Exec("DROP SCHEMA " + schema + " CASCADE")
			_ = a.Close()
		}
	})
	u, err := url.Parse(base)
	if err != nil {
		tb.Fatal(err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	db, err := sql.Open("pgx", u.String())
	if err != nil {
		tb.Fatal(err)
	}
	db.SetMaxOpenConns(16)
	tb.Cleanup(func() { _ = db.Close() })
	return database{"postgres", Postgres, db}
}

// redisAddr is CACHEASIDE_REDIS_ADDR, or a miniredis of the test's own.
func redisAddr(tb testing.TB) (string, *miniredis.Miniredis) {
	if a := os.Getenv("CACHEASIDE_REDIS_ADDR"); a != "" {
		return a, nil
	}
	mr := miniredis.RunT(tb)
	return mr.Addr(), mr
}

func newCache(t testing.TB, addr, name string, d cacheaside.Degradation) *cacheaside.Cache[string] {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	if d.OpTimeout == 0 {
		d.OpTimeout = 2 * time.Second
	}
	c, err := cacheaside.New[string](rdb, &cacheaside.Options[string]{Name: name, Degradation: d})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func newOutbox(t testing.TB, db database, o *Options) *Outbox {
	t.Helper()
	ob, err := New(db.db, db.d, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Migrate(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := db.db.Exec(`CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, title TEXT NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return ob
}

func pending(t *testing.T, db database, ob *Outbox) int {
	t.Helper()
	var n int
	if err := db.db.QueryRow("SELECT count(*) FROM " + ob.table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// write changes task id's title and records its invalidation in one
// transaction, which it commits or rolls back.
func write(t *testing.T, db database, ob *Outbox, id int, title string, commit bool, targets ...Target) {
	t.Helper()
	ctx := context.Background()
	tx, err := db.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	q := "INSERT INTO tasks (id, title) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET title = excluded.title"
	if db.d == Postgres {
		q = "INSERT INTO tasks (id, title) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET title = excluded.title"
	}
	if _, err := tx.ExecContext(ctx, q, id, title); err != nil {
		t.Fatal(err)
	}
	if _, err := ob.Record(ctx, tx, targets...); err != nil {
		t.Fatal(err)
	}
	if commit {
		err = tx.Commit()
	} else {
		err = tx.Rollback()
	}
	if err != nil {
		t.Fatal(err)
	}
}

func title(db database, id int) func(context.Context) (string, error) {
	return func(ctx context.Context) (string, error) {
		q := "SELECT title FROM tasks WHERE id = ?"
		if db.d == Postgres {
			q = "SELECT title FROM tasks WHERE id = $1"
		}
		var s string
		err := db.db.QueryRowContext(ctx, q, id).Scan(&s)
		if errors.Is(err, sql.ErrNoRows) {
			return "", cacheaside.ErrNotFound
		}
		return s, err
	}
}

// TestRecordThenRelay: a write and its invalidations commit together; the
// writer "dies" before invalidating (it never calls Invalidate), and a
// relay started afterwards, with caches of its own, applies the rows:
// the writer's cache reads the new title. A prefix target clears every key
// under it. A rolled-back write leaves nothing to apply.
func TestRecordThenRelay(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		ctx := context.Background()
		addr, _ := redisAddr(t)
		ob := newOutbox(t, db, nil)
		name := "task" + unique()
		writer := newCache(t, addr, name, cacheaside.Degradation{})
		p := "v1:" + name + ":"
		write(t, db, ob, 1, "old", true)
		write(t, db, ob, 2, "old two", true)
		for id := 1; id <= 2; id++ {
			if v, err := writer.Get(ctx, fmt.Sprint(p, id), title(db, id)); err != nil || v[:3] != "old" {
				t.Fatalf("Get = %q, %v", v, err)
			}
		}

		write(t, db, ob, 1, "rolled back", false, Keys(name, p+"1")...)
		write(t, db, ob, 1, "new", true, Keys(name, p+"1")...) // the writer dies here
		if v, _ := writer.Get(ctx, p+"1", title(db, 1)); v != "old" {
			t.Fatalf("before the relay: %q (the test needs the old entry cached)", v)
		}
		if n := pending(t, db, ob); n != 1 {
			t.Fatalf("%d rows in the outbox, want 1: the rolled-back write's row must not be there", n)
		}

		relayCache := newCache(t, addr, name, cacheaside.Degradation{})
		relay := newOutbox(t, db, nil)
		if n, err := relay.ApplyOnce(ctx, relayCache); err != nil || n != 1 {
			t.Fatalf("ApplyOnce = %d, %v; want the one row", n, err)
		}
		if v, _ := writer.Get(ctx, p+"1", title(db, 1)); v != "new" {
			t.Fatalf("after the relay: %q, want new", v)
		}
		if n := pending(t, db, ob); n != 0 {
			t.Fatalf("%d rows left", n)
		}

		write(t, db, ob, 2, "new two", true, Target{Cache: name, Prefix: p})
		if n, err := relay.ApplyOnce(ctx, relayCache); err != nil || n != 1 {
			t.Fatalf("ApplyOnce of the prefix = %d, %v", n, err)
		}
		if v, _ := writer.Get(ctx, p+"2", title(db, 2)); v != "new two" {
			t.Fatalf("after the prefix: %q", v)
		}
		if s := relay.Stats(); s.Applied != 2 || s.Batches != 2 || s.Failures != 0 {
			t.Fatalf("stats %+v", s)
		}
	})
}

// TestRedisDownKeepsRows: while Redis refuses, a batch fails and its rows
// stay; once Redis is back, the same rows are applied.
func TestRedisDownKeepsRows(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		ctx := context.Background()
		mr := miniredis.RunT(t)
		name := "task" + unique()
		c := newCache(t, mr.Addr(), name, cacheaside.Degradation{NoBreaker: true, NoRetryInvalidations: true, OpTimeout: 200 * time.Millisecond})
		ob := newOutbox(t, db, nil)
		write(t, db, ob, 1, "t", true, Keys(name, "v1:x:1", "v1:x:2")...)
		mr.Close()
		if n, err := ob.ApplyOnce(ctx, c); err == nil || n != 0 {
			t.Fatalf("ApplyOnce with Redis down = %d, %v; want an error", n, err)
		}
		if n := pending(t, db, ob); n != 2 {
			t.Fatalf("%d rows after the failure, want 2", n)
		}
		if err := mr.Restart(); err != nil {
			t.Fatal(err)
		}
		if n, err := ob.ApplyOnce(ctx, c); err != nil || n != 2 {
			t.Fatalf("ApplyOnce with Redis back = %d, %v", n, err)
		}
		if s := ob.Stats(); s.Failures != 1 || s.Applied != 2 {
			t.Fatalf("stats %+v", s)
		}
	})
}

// counting is a cache that counts the keys it was asked to invalidate.
type counting struct {
	Invalidator
	mu   sync.Mutex
	seen map[string]int
}

func (c *counting) Invalidate(ctx context.Context, keys ...string) (int64, error) {
	c.mu.Lock()
	for _, k := range keys {
		c.seen[k]++
	}
	c.mu.Unlock()
	return c.Invalidator.Invalidate(ctx, keys...)
}

// TestRelaysShareTheWork: four relays at once drain 2,000 rows, written
// while they run; every key is invalidated, none twice (SKIP LOCKED on
// PostgreSQL, SQLite's write lock), and the table ends empty. Rows of a
// cache no relay has are left alone.
func TestRelaysShareTheWork(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		addr, _ := redisAddr(t)
		name := "task" + unique()
		c := &counting{Invalidator: newCache(t, addr, name, cacheaside.Degradation{}), seen: map[string]int{}}
		ob := newOutbox(t, db, &Options{Batch: 50, Poll: 5 * time.Millisecond})
		write(t, db, ob, 0, "other", true, Keys("nobody's", "v1:other:1")...)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() { _ = ob.Relay(ctx, c) })
		}
		const rows = 2000
		for i := 0; i < rows; i += 100 {
			var ts []Target
			for j := i; j < i+100; j++ {
				ts = append(ts, Target{Cache: name, Key: fmt.Sprint("v1:k:", j)})
			}
			write(t, db, ob, i, "t", true, ts...)
		}
		deadline := time.Now().Add(30 * time.Second)
		for pending(t, db, ob) > 1 {
			if time.Now().After(deadline) {
				t.Fatalf("%d rows left after 30s", pending(t, db, ob))
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		wg.Wait()
		c.mu.Lock()
		defer c.mu.Unlock()
		twice := 0
		for i := range rows {
			switch n := c.seen[fmt.Sprint("v1:k:", i)]; {
			case n == 0:
				t.Fatalf("key %d never invalidated", i)
			case n > 1:
				twice++
			}
		}
		if twice > 0 {
			t.Errorf("%d keys invalidated more than once", twice)
		}
		if s := ob.Stats(); s.Applied != rows {
			t.Errorf("applied %d rows, want %d (%+v)", s.Applied, rows, s)
		}
	})
}

// TestBadInput: what New, Record and the relays refuse.
func TestBadInput(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		ctx := context.Background()
		if _, err := New(nil, db.d, nil); err == nil {
			t.Error("New(nil db) succeeded")
		}
		if _, err := New(db.db, Dialect(9), nil); err == nil {
			t.Error("an unknown dialect was accepted")
		}
		if _, err := New(db.db, db.d, &Options{Table: "x; DROP TABLE tasks"}); err == nil {
			t.Error("a table name with SQL in it was accepted")
		}
		ob := newOutbox(t, db, nil)
		tx, err := db.db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		for _, bad := range []Target{{Key: "k"}, {Cache: "c"}, {Cache: "c", Key: "k", Prefix: "p"}} {
			if _, err := ob.Record(ctx, tx, Target{Cache: "c", Key: "fine"}, bad); err == nil {
				t.Errorf("Record(%+v) succeeded", bad)
			}
		}
		if _, err := ob.Record(ctx, nil, Keys("c", "k")...); err == nil {
			t.Error("Record without a transaction succeeded")
		}
		_ = tx.Rollback()
		if n := pending(t, db, ob); n != 0 {
			t.Errorf("%d rows written by refused calls", n)
		}
		if _, err := ob.ApplyOnce(ctx); err == nil {
			t.Error("a relay without caches was accepted")
		}
	})
}

// BenchmarkRelay reports the rows one relay applies per second, in
// batches of 500: each iteration writes 5,000 rows (not timed), then drains
// them with ApplyOnce, on SQLite and (with DATABASE_URL) PostgreSQL, to
// CACHEASIDE_REDIS_ADDR or a miniredis.
func BenchmarkRelay(b *testing.B) {
	for _, db := range openDBs(b) {
		b.Run(db.name, func(b *testing.B) {
			ctx := context.Background()
			addr, _ := redisAddr(b)
			name := "bench" + unique()
			c := newCache(b, addr, name, cacheaside.Degradation{})
			ob := newOutbox(b, db, nil)
			const rows = 5000
			var applied int
			var took time.Duration
			for b.Loop() {
				b.StopTimer()
				tx, err := db.db.BeginTx(ctx, nil)
				if err != nil {
					b.Fatal(err)
				}
				ts := make([]Target, rows)
				for i := range ts {
					ts[i] = Target{Cache: name, Key: fmt.Sprint("v1:bench:", i)}
				}
				if _, err := ob.Record(ctx, tx, ts...); err != nil {
					b.Fatal(err)
				}
				if err := tx.Commit(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				t0 := time.Now()
				for {
					n, err := ob.ApplyOnce(ctx, c)
					if err != nil {
						b.Fatal(err)
					}
					applied += n
					if n == 0 {
						break
					}
				}
				took += time.Since(t0)
			}
			b.ReportMetric(float64(applied)/took.Seconds(), "rows/s")
		})
	}
}

// TestNamespacesAndPoisonRows: a namespace target bumps the namespace (the
// writer's page reads the new value); rows that can never be applied (a
// key the cache refuses, a namespace that does not parse) are logged,
// counted and deleted, and do not hold back the good row beside them.
func TestNamespacesAndPoisonRows(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		ctx := context.Background()
		addr, _ := redisAddr(t)
		name := "lists" + unique()
		rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = rdb.Close() })
		lists, err := cacheaside.New[string](rdb, &cacheaside.Options[string]{Name: name, Namespaced: true, Degradation: cacheaside.Degradation{OpTimeout: 2 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lists.Close() })
		ns := cacheaside.MustKeyspace(name, 1).Namespace("org", "ac:me")
		key := ns.Key("page", "1")
		ob := newOutbox(t, db, nil)
		write(t, db, ob, 1, "old", true)
		if v, _ := lists.Get(ctx, key, title(db, 1)); v != "old" {
			t.Fatalf("Get = %q", v)
		}
		write(t, db, ob, 1, "new", true, Target{Cache: name, Namespace: ns})
		if n, err := ob.ApplyOnce(ctx, lists); err != nil || n != 1 {
			t.Fatalf("ApplyOnce = %d, %v", n, err)
		}
		if v, _ := lists.Get(ctx, key, title(db, 1)); v != "new" {
			t.Fatalf("after the namespace bump: %q", v)
		}

		plain := newCache(t, addr, "plain"+unique(), cacheaside.Degradation{})
		if _, err := plain.Get(ctx, "v1:p:1", title(db, 1)); err != nil {
			t.Fatal(err)
		}
		write(t, db, ob, 1, "newer", true)
		q := "INSERT INTO " + ob.table + " (cache, kind, target) VALUES (?, 'key', ?), (?, 'namespace', ?), (?, 'key', ?)"
		if db.d == Postgres {
			q = "INSERT INTO " + ob.table + " (cache, kind, target) VALUES ($1, 'key', $2), ($3, 'namespace', $4), ($5, 'key', $6)"
		}
		if _, err := db.db.ExecContext(ctx, q, plain.Name(), strings.Repeat("k", 1100), name, "not a namespace", plain.Name(), "v1:p:1"); err != nil {
			t.Fatal(err)
		}
		if n, err := ob.ApplyOnce(ctx, lists, plain); err != nil || n != 3 {
			t.Fatalf("ApplyOnce with two poison rows = %d, %v; want all 3 handled", n, err)
		}
		if s := ob.Stats(); s.Dropped != 2 {
			t.Fatalf("stats %+v; want 2 dropped", s)
		}
		if v, _ := plain.Get(ctx, "v1:p:1", title(db, 1)); v != "newer" {
			t.Fatalf("the good row beside the poison ones was not applied: %q", v)
		}
		if n := pending(t, db, ob); n != 0 {
			t.Fatalf("%d rows left", n)
		}
	})
}

// TestTagTargets: a tag target invalidates every entry carrying the tag,
// and only those; on PostgreSQL, Migrate widens the kind check of a table
// made before tag targets existed.
func TestTagTargets(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		ctx := context.Background()
		addr, _ := redisAddr(t)
		name := "lists" + unique()
		rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = rdb.Close() })
		lists, err := cacheaside.New[string](rdb, &cacheaside.Options[string]{Name: name, Degradation: cacheaside.Degradation{OpTimeout: 2 * time.Second},
			Tags: func(key string) []string { return []string{"org:" + strings.Split(key, ":")[2]} }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lists.Close() })
		ob := newOutbox(t, db, nil)
		if db.d == Postgres {
			table := ob.table[strings.LastIndex(ob.table, ".")+1:]
			if _, err := db.db.ExecContext(ctx, `ALTER TABLE `+ob.table+` DROP CONSTRAINT `+table+`_kind_check, ADD CONSTRAINT `+table+
				`_kind_check CHECK (kind IN ('key', 'prefix', 'namespace'))`); err != nil {
				t.Fatal(err)
			}
			if err := ob.Migrate(ctx, nil); err != nil {
				t.Fatal(err)
			}
		}
		acme, other := "v1:"+name+":acme:page:1", "v1:"+name+":other:page:1"
		write(t, db, ob, 1, "old", true)
		for _, k := range []string{acme, other} {
			if v, _ := lists.Get(ctx, k, title(db, 1)); v != "old" {
				t.Fatalf("Get %s = %q", k, v)
			}
		}
		write(t, db, ob, 1, "new", true, Target{Cache: name, Tag: "org:acme"})
		if n, err := ob.ApplyOnce(ctx, lists); err != nil || n != 1 {
			t.Fatalf("ApplyOnce = %d, %v", n, err)
		}
		if v, _ := lists.Get(ctx, acme, title(db, 1)); v != "new" {
			t.Fatalf("after the tag's invalidation: %q", v)
		}
		if v, _ := lists.Get(ctx, other, title(db, 1)); v != "old" {
			t.Fatalf("an entry without the tag was invalidated: %q", v)
		}
		tx, err := db.db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		if _, err := ob.Record(ctx, tx, Target{Cache: name, Tag: "t", Key: "k"}); !errors.Is(err, errInvalidTarget) {
			t.Fatalf("a Target with a Tag and a Key: %v", err)
		}
	})
}

// TestNotifyWakesRelay (PostgreSQL): with Notify, a relay that polls only
// once a minute applies a committed write within seconds, woken by the
// NOTIFY that Record sent in the write's transaction; a rolled-back write
// sends none.
func TestNotifyWakesRelay(t *testing.T) {
	if os.Getenv("DATABASE_URL") == "" {
		t.Skip("LISTEN/NOTIFY needs PostgreSQL: set DATABASE_URL")
	}
	db := openPostgres(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, _ := redisAddr(t)
	name := "task" + unique()
	c := newCache(t, addr, name, cacheaside.Degradation{})
	notify := os.Getenv("DATABASE_URL")
	ob := newOutbox(t, db, &Options{Poll: time.Minute, Notify: notify})
	done := make(chan error, 1)
	go func() { done <- ob.Relay(ctx, c) }()
	// Once its LISTEN connection is up (and its look on connecting is
	// over), the write below can only reach the relay by NOTIFY.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := db.db.QueryRowContext(ctx, `SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN "'||$1||'"'`, ob.table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the relay's LISTEN connection never came up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	applied := ob.Stats().Applied
	write(t, db, ob, 2, "t", true, Keys(name, "v1:n:2")...)
	for ob.Stats().Applied == applied {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("a committed write not applied 10s later by a relay that polls once a minute: no NOTIFY")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("commit to applied: %v", time.Since(start).Round(time.Millisecond))
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Relay returned %v", err)
	}
}

// TestFastPathAndGrace: a writer that invalidates its keys itself after
// the commit deletes its rows with Done, and no relay applies them again;
// a writer that dies before that leaves its rows, which a relay with a
// grace period applies once they are older than it, and not before.
func TestFastPathAndGrace(t *testing.T) {
	forEachDB(t, func(t *testing.T, db database) {
		ctx := context.Background()
		addr, _ := redisAddr(t)
		name := "task" + unique()
		c := &counting{Invalidator: newCache(t, addr, name, cacheaside.Degradation{}), seen: map[string]int{}}
		ob := newOutbox(t, db, &Options{Grace: 500 * time.Millisecond})
		commit := func(key string) Receipt {
			tx, err := db.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			rec, err := ob.Record(ctx, tx, Keys(name, key)...)
			if err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			return rec
		}
		rec := commit("v1:f:1")
		if _, err := c.Invalidate(ctx, "v1:f:1"); err != nil { // the writer's own invalidation
			t.Fatal(err)
		}
		if err := ob.Done(ctx, rec); err != nil {
			t.Fatal(err)
		}
		commit("v1:f:2") // this writer dies after its commit
		if n := pending(t, db, ob); n != 1 {
			t.Fatalf("%d rows after one Done and one death, want 1", n)
		}
		if n, err := ob.ApplyOnce(ctx, c); err != nil || n != 0 {
			t.Fatalf("ApplyOnce of a row younger than the grace = %d, %v; want 0", n, err)
		}
		time.Sleep(600 * time.Millisecond)
		if n, err := ob.ApplyOnce(ctx, c); err != nil || n != 1 {
			t.Fatalf("ApplyOnce after the grace = %d, %v; want the dead writer's row", n, err)
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.seen["v1:f:1"] != 1 || c.seen["v1:f:2"] != 1 {
			t.Fatalf("invalidations %v; want each key once", c.seen)
		}
	})
}
