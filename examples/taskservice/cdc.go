package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox"
)

// Change data capture (lecture 4.3: "forget to add invalidation? Stale
// data"). The app invalidates its own writes, and its outbox makes that
// survive a crash; a write it does not make (a psql session, a migration,
// another service, an UPDATE … WHERE) is invisible to both. With
// PostgreSQL at wal_level=logical the app also reads the database's log
// (cacheoutbox.Listener): each changed task row, old and new, clears its
// task key and its orgs' list namespaces, wherever the write came from.
// The app's own writes are then invalidated twice, which is harmless.
//
// It makes, once, what the listener needs: a publication of the tasks
// table, REPLICA IDENTITY FULL on it (the old row's org), and the slot, so
// the writes after startup are seen. Slot and publication are named after
// the schema ("taskservice", or "taskservice_<schema>" outside public).
// A slot nobody reads holds WAL back: drop it when retiring the app
// (SELECT pg_drop_replication_slot('taskservice')). CDC=off turns it off.

var plainName = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)

// startCDC starts the listener when the database can feed it, and returns
// what stops it (nil: not started, and why is logged).
func (a *app) startCDC(ctx context.Context, e env, reg *prometheus.Registry) (stop func(), err error) {
	if a.store.dialect != "pgx" || e.cdc == "off" {
		return nil, nil
	}
	db := a.store.db
	var level, schema string
	if err := db.QueryRowContext(ctx, `SELECT current_setting('wal_level'), current_schema()`).Scan(&level, &schema); err != nil {
		return nil, fmt.Errorf("cdc: %w", err)
	}
	if level != "logical" {
		a.log.Info("change data capture off: the database's wal_level is " + level + "; with wal_level=logical, writes made outside the app reach the cache too")
		return nil, nil
	}
	name := "taskservice"
	if schema != "public" {
		name += "_" + schema
	}
	if !plainName.MatchString(name) {
		return nil, fmt.Errorf("cdc: schema %q makes no plain slot name", schema)
	}
	for _, q := range []string{
		`ALTER TABLE tasks REPLICA IDENTITY FULL`,
		`CREATE PUBLICATION ` + name + ` FOR TABLE tasks`,
		`SELECT pg_create_logical_replication_slot('` + name + `', 'pgoutput')`,
	} {
		var pgErr *pgconn.PgError
		if _, err := db.ExecContext(ctx, q); err != nil && !(errors.As(err, &pgErr) && pgErr.Code == "42710") { // 42710: made already
			return nil, fmt.Errorf("cdc: %s: %w", q, err)
		}
	}
	svc := a.svc
	table := cacheoutbox.Table{
		Name: schema + ".tasks",
		Targets: func(c cacheoutbox.Change) []cacheoutbox.Target {
			var ts []cacheoutbox.Target
			for _, r := range []cacheoutbox.Row{c.Old, c.New} {
				if id, err := strconv.ParseInt(r["id"], 10, 64); err == nil {
					ch := change{id: id, org: r["org"]}
					if as, err := strconv.ParseInt(r["assignee"], 10, 64); err == nil {
						ch.assignees = []int64{as}
					}
					ts = append(ts, a.store.targets(ch)...)
				}
			}
			return ts
		},
		Truncate: []cacheoutbox.Target{{Cache: svc.tasks.Name(), Prefix: svc.taskKeys.Prefix()}, {Cache: svc.lists.Name(), Prefix: svc.listKeys.Prefix()}},
	}
	l, err := cacheoutbox.NewListener(cacheoutbox.ListenerOptions{Conn: e.databaseURL, Slot: name, Publication: name,
		Tables: []cacheoutbox.Table{table}, Logger: a.log}, svc.tasks, svc.lists)
	if err != nil {
		return nil, err
	}
	a.cdc = l
	lag := func(f func(cacheoutbox.ListenerStats) float64) func() float64 {
		return func() float64 { return f(l.Stats()) }
	}
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "taskservice_cdc_applied_total", Help: "Invalidations applied from the database's change stream."},
			lag(func(s cacheoutbox.ListenerStats) float64 { return float64(s.Applied) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "taskservice_cdc_lag_seconds", Help: "Commit to invalidated, of the last transaction from the change stream."},
			lag(func(s cacheoutbox.ListenerStats) float64 { return s.Lag.Seconds() })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "taskservice_cdc_lag_bytes", Help: "WAL between the server's end and the position the change stream confirmed."},
			lag(func(s cacheoutbox.ListenerStats) float64 { return float64(s.LagBytes) })),
	)
	lctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() { defer close(done); _ = l.Run(lctx) }()
	a.log.Info("change data capture on", slog.String("slot", name), slog.String("table", table.Name))
	return func() { cancel(); <-done }, nil
}

// cdcMode reads CDC: "off" turns change data capture off; anything else
// leaves it on wherever the database allows it.
func cdcMode(s string) string { return strings.ToLower(strings.TrimSpace(s)) }
