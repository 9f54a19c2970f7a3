// Package cacheoutbox makes cacheaside invalidations durable: a
// transactional outbox over database/sql, on PostgreSQL and SQLite, for
// the writes the application makes, and a change-data-capture Listener on
// PostgreSQL's logical replication (cdc.go) for every write, whoever makes
// it.
//
// A write and the invalidations it needs commit together: the application
// records its targets (keys, prefixes, namespaces and tags of a named cache) in the same
// transaction as its data change (Record), and a relay (Relay) applies
// them through the library, with Cache.Invalidate, Cache.InvalidatePrefix
// and Cache.InvalidateNamespace, so the local tiers' bus and the writer's bypass
// of pending keys keep working, and deletes the rows only once Redis has
// confirmed them. A process killed between its commit and its
// invalidation leaves the rows behind, and the next relay applies them; a
// rolled-back transaction leaves nothing to apply. Applying a row twice is
// harmless (an invalidation is idempotent), which is what happens when a
// relay fails after Redis applied part of a batch.
//
// Several relays may run at once, in one process or many: on PostgreSQL
// each takes its batch with SELECT … FOR UPDATE SKIP LOCKED, so they share
// the rows without waiting on each other and apply each row once; on
// SQLite a relay's transaction begins with a write, which takes the
// database's write lock, so relays take turns.
package cacheoutbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/internal/wire"
)

// Dialect is the database's SQL dialect.
type Dialect int

const (
	Postgres Dialect = iota + 1 // PostgreSQL (9.5 or later: SKIP LOCKED), through pgx's database/sql driver or lib/pq
	SQLite                      // SQLite 3, through modernc.org/sqlite or mattn/go-sqlite3
)

// Options tunes an Outbox. The zero value of each field means the default
// written beside it.
type Options struct {
	Table  string        // the outbox table; default "cacheaside_outbox"
	Batch  int           // rows a relay applies per transaction; default 500
	Poll   time.Duration // how often an idle relay looks for rows; default 100ms (1s with Notify)
	Logger *slog.Logger  // relay failures, at most one line per failure streak; default slog.Default()

	// Grace is how old a row must be before a relay applies it: a writer
	// that invalidates right after its commit and then calls Done (the
	// fast path) leaves the relays only the rows it could not apply
	// (Redis refused, or the process died), instead of racing them for
	// every row. Default 0: rows are applied as soon as a relay sees them.
	Grace time.Duration

	// Notify (PostgreSQL only) is a connection string (a pgx URL or DSN)
	// for one LISTEN connection per relay: Record sends a NOTIFY in the
	// write's transaction, delivered when it commits, and the relay wakes
	// at once instead of at its next Poll, which stays as the fallback (a
	// lost connection is made again with a backoff). Empty: poll only.
	Notify string
}

// Outbox records invalidations in the application's transactions and
// relays them to the caches.
type Outbox struct {
	db     *sql.DB
	d      Dialect
	table  string
	batch  int
	poll   time.Duration
	log    *slog.Logger
	notify string        // Options.Notify
	grace  time.Duration // Options.Grace

	applied, batches, failures, dropped atomic.Uint64
}

var tableName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}$`)

// New returns an Outbox on db. It refuses a nil db, an unknown dialect, a
// table name that is not a plain SQL identifier, and negative options.
func New(db *sql.DB, d Dialect, o *Options) (*Outbox, error) {
	var opt Options
	if o != nil {
		opt = *o
	}
	switch {
	case db == nil:
		return nil, errors.New("cacheoutbox: nil *sql.DB")
	case d != Postgres && d != SQLite:
		return nil, fmt.Errorf("cacheoutbox: unknown dialect %d", d)
	case opt.Table != "" && !tableName.MatchString(opt.Table):
		return nil, fmt.Errorf("cacheoutbox: table name %q is not a plain SQL identifier", opt.Table)
	case opt.Batch < 0 || opt.Poll < 0 || opt.Grace < 0:
		return nil, fmt.Errorf("cacheoutbox: negative Batch %d, Poll %v or Grace %v", opt.Batch, opt.Poll, opt.Grace)
	case opt.Notify != "" && d != Postgres:
		return nil, errors.New("cacheoutbox: Notify needs PostgreSQL")
	}
	ob := &Outbox{db: db, d: d, table: opt.Table, batch: opt.Batch, poll: opt.Poll, log: opt.Logger, notify: opt.Notify, grace: opt.Grace}
	if ob.table == "" {
		ob.table = "cacheaside_outbox"
	}
	if ob.batch == 0 {
		ob.batch = 500
	}
	if ob.poll == 0 {
		ob.poll = 100 * time.Millisecond
		if ob.notify != "" {
			ob.poll = time.Second
		}
	}
	if ob.log == nil {
		ob.log = slog.Default()
	}
	return ob, nil
}

// Migrate creates the outbox table if it does not exist: in tx, if not
// nil (an application's schema transaction, so instances starting together
// do not race on CREATE TABLE), else on its own.
func (ob *Outbox) Migrate(ctx context.Context, tx *sql.Tx) error {
	exec := ob.db.ExecContext
	if tx != nil {
		exec = tx.ExecContext
	}
	id, now := "BIGSERIAL PRIMARY KEY", "TIMESTAMPTZ NOT NULL DEFAULT now()"
	if ob.d == SQLite {
		id, now = "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL NOT NULL DEFAULT (julianday('now'))"
	}
	_, err := exec(ctx, `CREATE TABLE IF NOT EXISTS `+ob.table+` (
		id `+id+`,
		cache TEXT NOT NULL,
		kind TEXT NOT NULL CHECK (kind IN ('key', 'prefix', 'namespace', 'tag')),
		target TEXT NOT NULL,
		created `+now+`
	)`)
	if err != nil {
		return fmt.Errorf("cacheoutbox: creating %s: %w", ob.table, err)
	}
	if ob.d == Postgres {
		// A table made by a version without tag targets: widen its check.
		name := ob.table[strings.LastIndex(ob.table, ".")+1:] + "_kind_check"
		if _, err := exec(ctx, `ALTER TABLE `+ob.table+` DROP CONSTRAINT IF EXISTS `+name+`, ADD CONSTRAINT `+name+
			` CHECK (kind IN ('key', 'prefix', 'namespace', 'tag'))`); err != nil {
			return fmt.Errorf("cacheoutbox: widening %s's kinds: %w", ob.table, err)
		}
	}
	return nil
}

// Target is one invalidation of the caches named Cache (their
// Options.Name): a key, every key under a prefix, a namespace, or every
// entry carrying a tag.
type Target struct {
	Cache     string
	Key       string               // Invalidate this key; or
	Prefix    string               // InvalidatePrefix this prefix; or
	Namespace cacheaside.Namespace // InvalidateNamespace this namespace; or
	Tag       string               // InvalidateTags this tag
}

// Keys is a Target for each key of cache.
func Keys(cache string, keys ...string) []Target {
	ts := make([]Target, len(keys))
	for i, k := range keys {
		ts[i] = Target{Cache: cache, Key: k}
	}
	return ts
}

// errInvalidTarget marks what Target.check refuses.
var errInvalidTarget = errors.New("cacheoutbox: invalid Target")

func (t Target) check() error {
	switch {
	case t.Cache == "":
		return fmt.Errorf("%w: no Cache", errInvalidTarget)
	}
	set := 0
	for _, s := range []string{t.Key, t.Prefix, t.Namespace.String(), t.Tag} {
		if s != "" {
			set++
		}
	}
	if set != 1 {
		return fmt.Errorf("%w: one of cache %q needs exactly one of Key, Prefix, Namespace and Tag", errInvalidTarget, t.Cache)
	}
	return nil
}

// kind is how a Target is stored: its kind and its target string.
func (t Target) kind() (string, string) {
	switch {
	case t.Key != "":
		return "key", t.Key
	case t.Prefix != "":
		return "prefix", t.Prefix
	case t.Tag != "":
		return "tag", t.Tag
	}
	return "namespace", t.Namespace.String()
}

// namespace rebuilds a stored namespace (its String form).
func namespace(s string) (cacheaside.Namespace, error) {
	name, version, parts, err := wire.SplitNamespace(s)
	if err != nil {
		return cacheaside.Namespace{}, &parseError{err}
	}
	ks, err := cacheaside.NewKeyspace(name, version)
	if err != nil {
		return cacheaside.Namespace{}, &parseError{fmt.Errorf("%q is not a namespace: %w", s, err)}
	}
	ns := ks.Namespace(parts...)
	if ns.String() != s {
		return cacheaside.Namespace{}, &parseError{fmt.Errorf("%q is not a namespace: Keyspace.Namespace would spell it %q", s, ns.String())}
	}
	return ns, nil
}

// Receipt names the rows one Record wrote, for Done.
type Receipt struct{ ids []int64 }

// Record adds targets to the outbox inside tx, the transaction of the data
// change they belong to: they are applied once it commits, and never if it
// rolls back. An invalid target fails the call before anything is written.
// The Receipt is for the fast path: a writer that invalidates the targets
// itself after the commit passes it to Done.
func (ob *Outbox) Record(ctx context.Context, tx *sql.Tx, targets ...Target) (Receipt, error) {
	var rec Receipt
	if tx == nil {
		return rec, errors.New("cacheoutbox: Record needs the data change's transaction")
	}
	for _, t := range targets {
		if err := t.check(); err != nil {
			return rec, err
		}
	}
	const perStmt = 200
	for len(targets) > 0 {
		n := min(len(targets), perStmt)
		var sb strings.Builder
		args := make([]any, 0, 3*n)
		sb.WriteString("INSERT INTO " + ob.table + " (cache, kind, target) VALUES ")
		for i, t := range targets[:n] {
			if i > 0 {
				sb.WriteString(", ")
			}
			sb.WriteString("(" + ob.ph(3*i+1) + ", " + ob.ph(3*i+2) + ", " + ob.ph(3*i+3) + ")")
			kind, target := t.kind()
			args = append(args, t.Cache, kind, target)
		}
		sb.WriteString(" RETURNING id")
		rows, err := tx.QueryContext(ctx, sb.String(), args...)
		if err != nil {
			return rec, fmt.Errorf("cacheoutbox: recording invalidations: %w", err)
		}
		for rows.Next() {
			var id int64
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return rec, fmt.Errorf("cacheoutbox: recording invalidations: %w", err)
			}
			rec.ids = append(rec.ids, id)
		}
		if err := errors.Join(rows.Close(), rows.Err()); err != nil {
			return rec, fmt.Errorf("cacheoutbox: recording invalidations: %w", err)
		}
		targets = targets[n:]
	}
	if ob.d == Postgres && ob.grace == 0 {
		// Delivered when tx commits (once per transaction and channel), and
		// never if it rolls back: relays with Notify wake at once. With a
		// grace period they would find nothing to apply yet.
		if _, err := tx.ExecContext(ctx, "SELECT pg_notify($1, '')", ob.table); err != nil {
			return rec, fmt.Errorf("cacheoutbox: recording invalidations: %w", err)
		}
	}
	return rec, nil
}

// Done deletes the rows of rec, after the committed transaction's writer
// applied their invalidations itself (every Invalidate returned nil), so
// that no relay applies them again. It is an optimization: a row a relay
// took meanwhile is applied twice, which is harmless; and a Done that
// fails leaves the rows to the relays.
func (ob *Outbox) Done(ctx context.Context, rec Receipt) error {
	if err := deleteIDs(ctx, ob.db.ExecContext, ob.table, ob.ph, rec.ids); err != nil {
		return fmt.Errorf("cacheoutbox: deleting applied rows: %w", err)
	}
	return nil
}

// deleteIDs deletes the rows ids of table through exec (the relay's
// transaction, or the database), 500 at a time.
func deleteIDs(ctx context.Context, exec func(context.Context, string, ...any) (sql.Result, error), table string, ph func(int) string, ids []int64) error {
	for len(ids) > 0 {
		k := min(len(ids), 500)
		ps := make([]string, k)
		args := make([]any, k)
		for i := range ps {
			ps[i], args[i] = ph(i+1), ids[i]
		}
		if _, err := exec(ctx, "DELETE FROM "+table+" WHERE id IN ("+strings.Join(ps, ", ")+")", args...); err != nil {
			return err
		}
		ids = ids[k:]
	}
	return nil
}

// applyTargets invalidates targets through caches, the one way the relay
// and the Listener apply them: the keys of each cache by Invalidate, up to
// 1,000 a call; each prefix, namespace and tag on its own; a target repeated
// or of a cache not given, once or not at all. A target that can never be
// applied (permanent) goes to drop, so it does not hold back the rest;
// any other error stops it, and the caller applies the whole batch again
// (an invalidation applied twice is harmless). It returns how many
// targets it applied.
func applyTargets(ctx context.Context, caches map[string]Invalidator, targets []Target, drop func(Target, error)) (int, error) {
	keys := map[string][]string{}
	seen := make(map[Target]bool, len(targets))
	applied := 0
	for _, t := range targets {
		c, ok := caches[t.Cache]
		if !ok || seen[t] {
			continue
		}
		seen[t] = true
		if err := t.check(); err != nil {
			drop(t, err)
			continue
		}
		var err error
		switch kind, target := t.kind(); kind {
		case "key":
			keys[t.Cache] = append(keys[t.Cache], target)
			continue
		case "prefix":
			_, err = c.InvalidatePrefix(ctx, target)
		case "namespace":
			err = c.InvalidateNamespace(ctx, t.Namespace)
		case "tag":
			err = c.InvalidateTags(ctx, t.Tag)
		}
		switch {
		case permanent(err):
			drop(t, err)
		case err != nil:
			kind, target := t.kind()
			return applied, fmt.Errorf("cacheoutbox: invalidating %s %q of cache %q: %w", kind, target, t.Cache, err)
		default:
			applied++
		}
	}
	for name, ks := range keys {
		for len(ks) > 0 {
			batch := ks[:min(len(ks), 1000)]
			ks = ks[len(batch):]
			_, err := caches[name].Invalidate(ctx, batch...)
			if err == nil {
				applied += len(batch)
				continue
			}
			if !errors.Is(err, cacheaside.ErrInvalidKey) {
				return applied, fmt.Errorf("cacheoutbox: Invalidate of %d keys of cache %q: %w", len(batch), name, err)
			}
			// One bad key fails the call: apply the keys one by one, and drop
			// the bad ones.
			for _, k := range batch {
				_, err := caches[name].Invalidate(ctx, k)
				switch {
				case permanent(err):
					drop(Target{Cache: name, Key: k}, err)
				case err != nil:
					return applied, fmt.Errorf("cacheoutbox: Invalidate of key %q of cache %q: %w", k, name, err)
				default:
					applied++
				}
			}
		}
	}
	return applied, nil
}

// permanent reports whether err says a target can never be applied: a key
// the cache refuses, a namespace that does not parse, a namespace of a
// cache without namespaces, an invalid Target.
func permanent(err error) bool {
	var parse *parseError
	return err != nil && (errors.Is(err, cacheaside.ErrInvalidKey) || errors.Is(err, cacheaside.ErrInvalidOptions) ||
		errors.As(err, &parse) || errors.Is(err, errInvalidTarget))
}

// drop logs a row that can never be applied (permanent) and counts it in
// Stats.Dropped; it is deleted with its batch, so it does not hold back
// every row after it.
func (ob *Outbox) drop(ctx context.Context, cache, target string, err error) {
	ob.dropped.Add(1)
	ob.log.LogAttrs(ctx, slog.LevelError, "cacheoutbox: dropping an outbox row that can never be applied",
		slog.String("table", ob.table), slog.String("cache", cache), slog.String("target", target[:min(len(target), 200)]), slog.Any("err", err))
}

// parseError is a stored namespace that does not parse.
type parseError struct{ err error }

func (e *parseError) Error() string { return e.err.Error() }
func (e *parseError) Unwrap() error { return e.err }

// ph is the i-th (from 1) placeholder of the dialect.
func (ob *Outbox) ph(i int) string {
	if ob.d == Postgres {
		return fmt.Sprintf("$%d", i)
	}
	return "?"
}

// Invalidator is what a relay needs of a cache; *cacheaside.Cache[T] has
// it.
type Invalidator interface {
	Name() string
	Invalidate(ctx context.Context, keys ...string) (int64, error)
	InvalidatePrefix(ctx context.Context, prefix string) (int64, error)
	InvalidateNamespace(ctx context.Context, ns cacheaside.Namespace) error
	InvalidateTags(ctx context.Context, tags ...string) error
}

// Stats counts what the relays of this Outbox did.
type Stats struct {
	Applied  uint64 // rows applied and deleted
	Batches  uint64 // transactions that applied rows
	Failures uint64 // batches that failed (their rows stay, and are tried again)
	Dropped  uint64 // rows that can never be applied (a key the cache refuses, a namespace that does not parse), logged and deleted
}

// Stats returns the relays' counts so far.
func (ob *Outbox) Stats() Stats {
	return Stats{Applied: ob.applied.Load(), Batches: ob.batches.Load(), Failures: ob.failures.Load(), Dropped: ob.dropped.Load()}
}

// Relay applies the outbox's rows for caches until ctx ends, and returns
// ctx's error. Rows for caches it was not given are left for a relay that
// has them. A failed batch (Redis down, the database gone) is logged once
// per streak of failures and tried again every Poll; its rows stay in the
// table meanwhile.
func (ob *Outbox) Relay(ctx context.Context, caches ...Invalidator) error {
	byName, err := named(caches)
	if err != nil {
		return err
	}
	var wake <-chan struct{}
	if ob.notify != "" {
		w := make(chan struct{}, 1)
		done := make(chan struct{})
		go func() { defer close(done); ob.listen(ctx, w) }()
		defer func() { <-done }()
		wake = w
	}
	failing := false
	for {
		n, err := ob.apply(ctx, byName)
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			if !failing {
				ob.log.LogAttrs(ctx, slog.LevelWarn, "cacheoutbox: relaying invalidations failed; retrying", slog.String("table", ob.table), slog.Any("err", err))
			}
			failing = true
		case failing:
			failing = false
			ob.log.LogAttrs(ctx, slog.LevelInfo, "cacheoutbox: relaying invalidations again", slog.String("table", ob.table))
		}
		if err == nil && n == ob.batch {
			continue // more may be waiting
		}
		t := time.NewTimer(ob.poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		case <-wake:
			t.Stop()
		}
	}
}

// listen holds a LISTEN connection on the outbox's channel until ctx
// ends, and signals wake for each notification (and each new connection:
// rows may have come while there was none). A lost connection is made
// again after a backoff from 100ms to 5s.
func (ob *Outbox) listen(ctx context.Context, wake chan<- struct{}) {
	signal := func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := func() error {
			conn, err := pgx.Connect(ctx, ob.notify)
			if err != nil {
				return err
			}
			defer conn.Close(context.WithoutCancel(ctx))
			if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{ob.table}.Sanitize()); err != nil {
				return err
			}
			backoff = 100 * time.Millisecond
			signal()
			for {
				if _, err := conn.WaitForNotification(ctx); err != nil {
					return err
				}
				signal()
			}
		}()
		if ctx.Err() != nil {
			return
		}
		ob.log.LogAttrs(ctx, slog.LevelWarn, "cacheoutbox: the LISTEN connection failed; polling until it is back", slog.String("table", ob.table), slog.Any("err", err))
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// ApplyOnce applies one batch of rows for caches (at most Options.Batch)
// and returns how many it applied: for a caller that drives the outbox
// itself (a cron job, a test).
func (ob *Outbox) ApplyOnce(ctx context.Context, caches ...Invalidator) (int, error) {
	byName, err := named(caches)
	if err != nil {
		return 0, err
	}
	return ob.apply(ctx, byName)
}

func named(caches []Invalidator) (map[string]Invalidator, error) {
	if len(caches) == 0 {
		return nil, errors.New("cacheoutbox: a relay needs at least one cache")
	}
	m := make(map[string]Invalidator, len(caches))
	for _, c := range caches {
		if c == nil {
			return nil, errors.New("cacheoutbox: nil cache")
		}
		if _, dup := m[c.Name()]; dup {
			return nil, fmt.Errorf("cacheoutbox: two caches named %q", c.Name())
		}
		m[c.Name()] = c
	}
	return m, nil
}

// apply takes one batch in a transaction, applies it through the caches
// and deletes its rows, committing only if every invalidation landed.
func (ob *Outbox) apply(ctx context.Context, caches map[string]Invalidator) (n int, err error) {
	defer func() {
		if err != nil && ctx.Err() == nil {
			ob.failures.Add(1)
		}
	}()
	tx, err := ob.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer func() { _ = tx.Rollback() }()
	if ob.d == SQLite {
		// A write first: it takes SQLite's write lock, so relays take turns
		// (and wait busy_timeout for it) rather than fail on upgrade.
		if _, err := tx.ExecContext(ctx, "DELETE FROM "+ob.table+" WHERE 0 = 1"); err != nil {
			return 0, err
		}
	}
	names := make([]any, 0, len(caches))
	phs := make([]string, 0, len(caches))
	for name := range caches {
		names = append(names, name)
		phs = append(phs, ob.ph(len(names)))
	}
	q := "SELECT id, cache, kind, target FROM " + ob.table + " WHERE cache IN (" + strings.Join(phs, ", ") + ")"
	if ob.grace > 0 {
		if ob.d == Postgres {
			q += fmt.Sprintf(" AND created < now() - interval '%d milliseconds'", ob.grace.Milliseconds())
		} else {
			q += fmt.Sprintf(" AND created < julianday('now') - %f", ob.grace.Hours()/24)
		}
	}
	q += " ORDER BY id LIMIT " + fmt.Sprint(ob.batch)
	if ob.d == Postgres {
		q += " FOR UPDATE SKIP LOCKED"
	}
	rows, err := tx.QueryContext(ctx, q, names...)
	if err != nil {
		return 0, err
	}
	type row struct {
		id                  int64
		cache, kind, target string
	}
	var batch []row
	for rows.Next() {
		var r row
		if err := rows.Scan(&r.id, &r.cache, &r.kind, &r.target); err != nil {
			rows.Close()
			return 0, err
		}
		batch = append(batch, r)
	}
	if err := rows.Close(); err != nil {
		return 0, err
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	if len(batch) == 0 {
		return 0, nil
	}
	targets := make([]Target, 0, len(batch))
	ids := make([]int64, 0, len(batch))
	for _, r := range batch {
		ids = append(ids, r.id)
		t := Target{Cache: r.cache}
		switch r.kind {
		case "key":
			t.Key = r.target
		case "prefix":
			t.Prefix = r.target
		case "tag":
			t.Tag = r.target
		case "namespace":
			ns, err := namespace(r.target)
			if err != nil {
				ob.drop(ctx, r.cache, r.target, err)
				continue
			}
			t.Namespace = ns
		}
		targets = append(targets, t)
	}
	if _, err := applyTargets(ctx, caches, targets, func(t Target, err error) {
		_, target := t.kind()
		ob.drop(ctx, t.Cache, target, err)
	}); err != nil {
		return 0, err
	}
	if err := deleteIDs(ctx, tx.ExecContext, ob.table, ob.ph, ids); err != nil {
		return 0, err
	}
	if err := tx.Commit(); err != nil {
		return 0, err
	}
	ob.applied.Add(uint64(len(batch)))
	ob.batches.Add(1)
	return len(batch), nil
}
