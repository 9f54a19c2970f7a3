package cacheoutbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// Change data capture. The outbox covers the writes the application
// makes; a Listener covers every write, whoever makes it (another service,
// a migration, a psql session, an UPDATE … WHERE that touched rows the code
// never named), by reading PostgreSQL's logical replication stream
// (pgoutput) of the tables of a publication. Each changed row is mapped to
// its targets by its table's Targets function, with the row's old and new
// values, so a task moved between orgs clears both orgs' lists; a TRUNCATE
// applies the table's Truncate targets. A transaction's targets are applied
// when its COMMIT arrives, and the listener confirms a WAL position to the
// server only after every invalidation up to it has landed in Redis, so a
// listener killed at any moment loses nothing: the next one resumes from
// the last confirmed position and applies again what was not confirmed (at
// least once). While no transaction is open, it confirms the server's WAL
// end as well, so an idle slot does not retain WAL.
//
// The database needs wal_level=logical, a publication of the tables
// (CREATE PUBLICATION cacheaside FOR TABLE tasks), REPLICA IDENTITY FULL
// on tables whose targets need old values beyond the key (ALTER TABLE
// tasks REPLICA IDENTITY FULL), a user with the REPLICATION attribute, and
// max_slot_wal_keep_size set so that a slot nobody reads cannot fill the
// disk. One slot serves one listener at a time: a second listener on the
// same slot retries until the first one's connection ends, and then takes
// over from its last confirmed position.

// Row is a changed row's columns as text; a NULL column is absent.
type Row map[string]string

// Change is one row change of a published table.
type Change struct {
	Table string // schema.table
	Op    string // "insert", "update" or "delete"
	Old   Row    // update, delete: the row before (all columns with REPLICA IDENTITY FULL, else the key, or nil for an update that kept the key)
	New   Row    // insert, update: the row after
}

// Table maps a published table's changes to invalidations.
type Table struct {
	Name     string                // schema.table, e.g. "public.tasks"
	Targets  func(Change) []Target // the targets of one change
	Truncate []Target              // the targets of a TRUNCATE of the table
}

// ListenerOptions configures a Listener.
type ListenerOptions struct {
	Conn        string // a connection string of a user with REPLICATION; replication=database is added
	Slot        string // the logical replication slot, made if missing; default "cacheaside"
	Publication string // the publication to read; default "cacheaside"
	Tables      []Table
	Logger      *slog.Logger // default slog.Default()
	// Batch bounds the targets held for one transaction: a transaction
	// with more (an UPDATE of a million rows) is applied in batches of
	// Batch as its changes arrive, and confirmed at its COMMIT. Default
	// 1000.
	Batch int
	// RetainWarn is how much WAL a slot may hold back, unread, before the
	// listener warns when it connects (and CheckSlot's Warn says so).
	// Default 64 MiB.
	RetainWarn int64
}

// Listener applies the invalidations of a publication's changes.
type Listener struct {
	o      ListenerOptions
	caches map[string]Invalidator
	tables map[string]Table

	applied, txns, dropped, batches atomic.Uint64
	confirmed                       atomic.Uint64 // LSN
	serverEnd                       atomic.Uint64 // LSN: the server's WAL end, as last reported
	lagNanos                        atomic.Int64  // commit to applied, of the last transaction
}

// NewListener checks o and the caches.
func NewListener(o ListenerOptions, caches ...Invalidator) (*Listener, error) {
	m, err := named(caches)
	if err != nil {
		return nil, err
	}
	if o.Conn == "" || len(o.Tables) == 0 {
		return nil, errors.New("cacheoutbox: a Listener needs Conn and at least one Table")
	}
	if o.Slot == "" {
		o.Slot = "cacheaside"
	}
	if o.Publication == "" {
		o.Publication = "cacheaside"
	}
	if !tableName.MatchString(o.Slot) {
		return nil, fmt.Errorf("cacheoutbox: slot name %q is not a plain identifier", o.Slot)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Batch < 0 || o.RetainWarn < 0 {
		return nil, errors.New("cacheoutbox: Batch and RetainWarn must not be negative")
	}
	if o.Batch == 0 {
		o.Batch = 1000
	}
	if o.RetainWarn == 0 {
		o.RetainWarn = 64 << 20
	}
	l := &Listener{o: o, caches: m, tables: map[string]Table{}}
	for _, t := range o.Tables {
		if !strings.Contains(t.Name, ".") || t.Targets == nil {
			return nil, fmt.Errorf("cacheoutbox: table %q needs a schema-qualified Name and Targets", t.Name)
		}
		l.tables[t.Name] = t
	}
	return l, nil
}

// ListenerStats is what a Listener has done.
type ListenerStats struct {
	Applied      uint64        // targets applied
	Batches      uint64        // applications of targets: one per transaction, more for one larger than Batch
	Transactions uint64        // transactions whose targets were applied and confirmed
	Dropped      uint64        // targets that can never be applied (a key the cache refuses, an invalid Target), logged and skipped
	Confirmed    string        // the WAL position confirmed to the server
	LagBytes     int64         // WAL between the server's end, as last reported, and the confirmed position
	Lag          time.Duration // commit to applied, of the last transaction
}

// Stats returns the Listener's counts.
func (l *Listener) Stats() ListenerStats {
	conf, end := l.confirmed.Load(), l.serverEnd.Load()
	return ListenerStats{Applied: l.applied.Load(), Batches: l.batches.Load(), Transactions: l.txns.Load(), Dropped: l.dropped.Load(),
		Confirmed: pglogrepl.LSN(conf).String(), LagBytes: int64(max(end, conf) - conf), Lag: time.Duration(l.lagNanos.Load())}
}

// SlotStatus is what the server says of a replication slot.
type SlotStatus struct {
	Exists   bool
	Active   bool   // a listener is reading it now
	Retained int64  // bytes of WAL the slot holds back: the server's WAL end minus its confirmed position
	WAL      string // the server's wal_status: "reserved", "extended", "unreserved" or "lost"
	KeepSize string // max_slot_wal_keep_size ("-1": unbounded)
	// Warn is why this slot needs a look, or "": it is retaining more than
	// the limit given to CheckSlot while nobody reads it, its WAL is
	// "unreserved" or "lost" (changes were or will be lost: invalidate the
	// caches whole), or max_slot_wal_keep_size is unbounded.
	Warn string
}

// CheckSlot asks the server at conn (any connection string; a monitoring
// job can call it while no listener runs) about slot: a slot nobody reads
// holds WAL back until max_slot_wal_keep_size, and past it the server
// drops the slot's changes.
func CheckSlot(ctx context.Context, conn, slot string, retainWarn int64) (SlotStatus, error) {
	c, err := pgconn.Connect(ctx, conn)
	if err != nil {
		return SlotStatus{}, err
	}
	defer c.Close(context.WithoutCancel(ctx))
	return checkSlot(ctx, c, slot, retainWarn)
}

func checkSlot(ctx context.Context, c *pgconn.PgConn, slot string, retainWarn int64) (SlotStatus, error) {
	if !tableName.MatchString(slot) {
		return SlotStatus{}, fmt.Errorf("cacheoutbox: slot name %q is not a plain identifier", slot)
	}
	rs, err := c.Exec(ctx, `SELECT active::text, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint::text,
		coalesce(wal_status, ''), current_setting('max_slot_wal_keep_size')
		FROM pg_replication_slots WHERE slot_name = '`+slot+`'`).ReadAll()
	if err != nil {
		return SlotStatus{}, err
	}
	if len(rs) != 1 || rs[0].Err != nil {
		if len(rs) == 1 {
			err = rs[0].Err
		}
		return SlotStatus{}, fmt.Errorf("cacheoutbox: asking about slot %s: %v", slot, err)
	}
	var s SlotStatus
	if len(rs[0].Rows) == 0 {
		return s, nil
	}
	r := rs[0].Rows[0]
	s.Exists = true
	s.Active = string(r[0]) == "true"
	fmt.Sscan(string(r[1]), &s.Retained)
	s.WAL, s.KeepSize = string(r[2]), string(r[3])
	switch {
	case s.WAL == "lost" || s.WAL == "unreserved":
		s.Warn = fmt.Sprintf("slot %s's WAL is %q: changes past max_slot_wal_keep_size (%s) were or will be dropped unread; invalidate the caches whole after the listener resumes", slot, s.WAL, s.KeepSize)
	case !s.Active && s.Retained > retainWarn:
		s.Warn = fmt.Sprintf("slot %s is retaining %d MiB of WAL with no listener reading it", slot, s.Retained>>20)
	case s.KeepSize == "-1":
		s.Warn = fmt.Sprintf("max_slot_wal_keep_size is unbounded: slot %s, unread, can fill the disk", slot)
	}
	return s, nil
}

// Run streams and applies changes until ctx ends, and returns ctx's
// error. A lost connection, a slot another listener holds, or Redis
// refusing an invalidation are retried with a backoff (100ms to 5s); an
// unconfirmed transaction is applied again from the start.
func (l *Listener) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		err := l.stream(ctx, func() { backoff = 100 * time.Millisecond })
		if ctx.Err() != nil {
			return ctx.Err()
		}
		l.o.Logger.LogAttrs(ctx, slog.LevelWarn, "cacheoutbox: change stream interrupted; resuming from the last confirmed position",
			slog.String("slot", l.o.Slot), slog.Any("err", err))
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// stream runs one replication connection.
func (l *Listener) stream(ctx context.Context, connected func()) error {
	conn, err := pgconn.Connect(ctx, withReplication(l.o.Conn))
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = pglogrepl.CreateReplicationSlot(ctx, conn, l.o.Slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{})
	var pgErr *pgconn.PgError
	if err != nil && !(errors.As(err, &pgErr) && pgErr.Code == "42710") { // duplicate_object: the slot exists
		return fmt.Errorf("creating slot %s: %w", l.o.Slot, err)
	}
	// Before streaming (the connection then only streams): a slot that held
	// back much WAL while no listener read it is worth a warning.
	if s, err := checkSlot(ctx, conn, l.o.Slot, l.o.RetainWarn); err != nil {
		return err
	} else if s.Warn != "" {
		l.o.Logger.LogAttrs(ctx, slog.LevelWarn, "cacheoutbox: "+s.Warn, slog.String("slot", l.o.Slot), slog.Int64("retained_bytes", s.Retained))
	}
	if err := pglogrepl.StartReplication(ctx, conn, l.o.Slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names '" + strings.ReplaceAll(l.o.Publication, "'", "''") + "'"}}); err != nil {
		return fmt.Errorf("starting replication on slot %s: %w", l.o.Slot, err)
	}
	connected()
	relations := map[uint32]*pglogrepl.RelationMessage{}
	var pending []Target // the open transaction's targets
	inTxn := false
	confirm := func(lsn pglogrepl.LSN) error {
		if uint64(lsn) > l.confirmed.Load() {
			l.confirmed.Store(uint64(lsn))
		}
		return pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: pglogrepl.LSN(l.confirmed.Load())})
	}
	nextStatus := time.Now().Add(5 * time.Second)
	for {
		if time.Now().After(nextStatus) {
			if err := confirm(0); err != nil {
				return err
			}
			nextStatus = time.Now().Add(5 * time.Second)
		}
		rctx, cancel := context.WithDeadline(ctx, nextStatus)
		raw, err := conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if pgconn.Timeout(err) && ctx.Err() == nil {
				continue
			}
			return err
		}
		if e, ok := raw.(*pgproto3.ErrorResponse); ok {
			return fmt.Errorf("replication error: %s (%s)", e.Message, e.Code)
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 {
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			pkm, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return err
			}
			l.serverEnd.Store(uint64(pkm.ServerWALEnd))
			end := pglogrepl.LSN(0)
			if !inTxn {
				end = pkm.ServerWALEnd // nothing open: everything up to here is applied
			}
			if pkm.ReplyRequested || end != 0 {
				if err := confirm(end); err != nil {
					return err
				}
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return err
			}
			l.serverEnd.Store(uint64(xld.ServerWALEnd))
			msg, err := pglogrepl.Parse(xld.WALData)
			if err != nil {
				return err
			}
			switch m := msg.(type) {
			case *pglogrepl.RelationMessage:
				relations[m.RelationID] = m
			case *pglogrepl.BeginMessage:
				inTxn, pending = true, pending[:0]
			case *pglogrepl.InsertMessage:
				pending = l.changed(pending, relations[m.RelationID], "insert", nil, m.Tuple)
			case *pglogrepl.UpdateMessage:
				pending = l.changed(pending, relations[m.RelationID], "update", m.OldTuple, m.NewTuple)
			case *pglogrepl.DeleteMessage:
				pending = l.changed(pending, relations[m.RelationID], "delete", m.OldTuple, nil)
			case *pglogrepl.TruncateMessage:
				for _, id := range m.RelationIDs {
					if rel := relations[id]; rel != nil {
						pending = append(pending, l.tables[rel.Namespace+"."+rel.RelationName].Truncate...)
					}
				}
			case *pglogrepl.CommitMessage:
				if err := l.apply(ctx, pending); err != nil {
					return err // not confirmed: the next stream applies it again
				}
				l.txns.Add(1)
				l.lagNanos.Store(int64(time.Since(m.CommitTime)))
				inTxn, pending = false, pending[:0]
				if err := confirm(m.TransactionEndLSN); err != nil {
					return err
				}
			}
			if len(pending) >= l.o.Batch {
				// A large transaction: pgoutput sends only committed ones,
				// so its targets can be applied before its COMMIT arrives;
				// it is confirmed at its COMMIT, and a listener that stops
				// before then applies it again from its start.
				if err := l.apply(ctx, pending); err != nil {
					return err
				}
				pending = pending[:0]
			}
		}
	}
}

// changed adds the targets of one row change.
func (l *Listener) changed(pending []Target, rel *pglogrepl.RelationMessage, op string, old, new *pglogrepl.TupleData) []Target {
	if rel == nil {
		return pending
	}
	t, ok := l.tables[rel.Namespace+"."+rel.RelationName]
	if !ok {
		return pending
	}
	c := Change{Table: t.Name, Op: op, Old: row(rel, old), New: row(rel, new)}
	return append(pending, t.Targets(c)...)
}

func row(rel *pglogrepl.RelationMessage, td *pglogrepl.TupleData) Row {
	if td == nil {
		return nil
	}
	r := Row{}
	for i, c := range td.Columns {
		if i < len(rel.Columns) && c.DataType == pglogrepl.TupleDataTypeText {
			r[rel.Columns[i].Name] = string(c.Data)
		}
	}
	return r
}

// apply invalidates a transaction's targets (applyTargets); one that can
// never be applied is logged and counted, not retried.
func (l *Listener) apply(ctx context.Context, targets []Target) error {
	n, err := applyTargets(ctx, l.caches, targets, func(t Target, err error) {
		l.dropped.Add(1)
		_, target := t.kind()
		l.o.Logger.LogAttrs(ctx, slog.LevelError, "cacheoutbox: dropping a change's invalidation that can never be applied",
			slog.String("slot", l.o.Slot), slog.String("cache", t.Cache), slog.String("target", target[:min(len(target), 200)]), slog.Any("err", err))
	})
	l.applied.Add(uint64(n))
	if err == nil && len(targets) > 0 {
		l.batches.Add(1)
	}
	return err
}

// withReplication adds replication=database to a connection string (URL
// or key=value form).
func withReplication(conn string) string {
	if strings.Contains(conn, "://") {
		if strings.Contains(conn, "?") {
			return conn + "&replication=database"
		}
		return conn + "?replication=database"
	}
	return conn + " replication=database"
}
