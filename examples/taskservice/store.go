package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // PostgreSQL driver "pgx"
	_ "modernc.org/sqlite"             // pure-Go SQLite driver "sqlite"

	"github.com/seed-b4ec662f/cacheaside"
	"github.com/seed-b4ec662f/cacheaside/extra/cacheoutbox"
)

// Task is a task row, as the API returns it and the cache stores it.
type Task struct {
	ID        int64     `json:"id"`
	Org       string    `json:"org"`
	Title     string    `json:"title"`
	Status    string    `json:"status"`
	Assignee  int64     `json:"assignee_id"`
	Tags      []string  `json:"tags"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Statuses a task may have.
var statuses = []string{"todo", "doing", "done"}

func validStatus(s string) bool {
	for _, v := range statuses {
		if s == v {
			return true
		}
	}
	return false
}

// TaskPage is one page of a task list.
type TaskPage struct {
	Org      string `json:"org"`
	Assignee int64  `json:"assignee_id,omitempty"`
	Status   string `json:"status,omitempty"`
	Page     int    `json:"page"`
	Size     int    `json:"size"`
	Total    int    `json:"total"`
	Tasks    []Task `json:"tasks"`
}

// OrgStats are the dashboard aggregates of one org.
type OrgStats struct {
	Org      string         `json:"org"`
	Total    int            `json:"total"`
	ByStatus map[string]int `json:"by_status"`
	Computed time.Time      `json:"computed_at"`
}

// Store is the source of truth: PostgreSQL or SQLite through database/sql.
// Latency, when set, is added to every query, to make the database as slow
// as a real one under load for the demo.
type Store struct {
	db      *sql.DB
	dialect string // "pgx" or "sqlite"
	latency time.Duration
	queries func() // counts queries; may be nil

	// outbox records each write's invalidations in the write's own
	// transaction (extra/cacheoutbox): targets names them for a change to
	// a task (set by the Service, which knows the keys and tags).
	outbox  *cacheoutbox.Outbox
	targets func(ch change) []cacheoutbox.Target
}

// change is what a write to a task touched: the task, its org, and its
// assignees before and after (one when it kept it). The caches it
// invalidates follow from it.
type change struct {
	id        int64
	org       string
	assignees []int64
}

// outboxGrace is how long the relay leaves a write's outbox rows to their
// writer, which deletes them once it has invalidated the keys itself.
var outboxGrace = 2 * time.Second

// errNoOrg is returned when a request names an org that does not exist.
var errNoOrg = errors.New("no such org")

// OpenStore opens the database at url (a PostgreSQL URL, or sqlite:PATH
// for an SQLite file), or an SQLite database at sqlitePath when url is
// empty, and creates and seeds the schema if it is empty. Several
// instances may start at once on one empty database: one creates and
// seeds, the others wait for it (see migrate).
func OpenStore(ctx context.Context, url, sqlitePath string) (*Store, error) {
	s := &Store{dialect: "sqlite"}
	var err error
	if path, ok := strings.CutPrefix(url, "sqlite:"); ok {
		url, sqlitePath = "", path
	}
	if url != "" {
		s.dialect = "pgx"
		s.db, err = sql.Open("pgx", url)
	} else {
		// _txlock=immediate: a transaction takes the write lock when it
		// begins, so two writers queue (busy_timeout) instead of failing
		// when the second tries to upgrade a read lock.
		s.db, err = sql.Open("sqlite", "file:"+sqlitePath+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_txlock=immediate")
		if err == nil {
			s.db.SetMaxOpenConns(1) // one writer; reads are cached anyway
		}
	}
	if err != nil {
		return nil, err
	}
	d := cacheoutbox.SQLite
	if s.dialect == "pgx" {
		d = cacheoutbox.Postgres
	}
	// A writer deletes its rows once it has invalidated the keys itself;
	// the relay takes what is left after the grace: rows of a write whose
	// invalidation Redis refused, or whose process died after its commit.
	if s.outbox, err = cacheoutbox.New(s.db, d, &cacheoutbox.Options{Grace: outboxGrace, Poll: 250 * time.Millisecond}); err != nil {
		s.db.Close()
		return nil, err
	}
	if err := s.ping(ctx); err != nil {
		s.db.Close()
		return nil, fmt.Errorf("database: %w", err)
	}
	if err := s.migrate(ctx); err != nil {
		s.db.Close()
		return nil, err
	}
	return s, nil
}

func (s *Store) Close() error { return s.db.Close() }

// ping opens the first connection. On SQLite, switching a new file to WAL
// needs an exclusive lock and does not wait for busy_timeout: an instance
// starting beside another that holds the schema lock gets SQLITE_BUSY, and
// tries again (for up to 10 s).
func (s *Store) ping(ctx context.Context) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.db.PingContext(ctx)
		if err == nil || s.dialect != "sqlite" || !strings.Contains(err.Error(), "SQLITE_BUSY") || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (s *Store) query() {
	if s.queries != nil {
		s.queries()
	}
}

func (s *Store) sleep(ctx context.Context) error {
	if s.latency <= 0 {
		return nil
	}
	t := time.NewTimer(s.latency)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Store) migrate(ctx context.Context) error {
	serial := "INTEGER PRIMARY KEY AUTOINCREMENT"
	if s.dialect == "pgx" {
		serial = "BIGSERIAL PRIMARY KEY"
	}
	stmts := []string{
		`CREATE TABLE IF NOT EXISTS orgs (slug TEXT PRIMARY KEY, name TEXT NOT NULL)`,
		`CREATE TABLE IF NOT EXISTS users (id ` + serial + `, org TEXT NOT NULL REFERENCES orgs(slug), name TEXT NOT NULL, role TEXT NOT NULL)`,
		`CREATE TABLE IF NOT EXISTS tasks (id ` + serial + `, org TEXT NOT NULL REFERENCES orgs(slug), title TEXT NOT NULL,
			status TEXT NOT NULL, assignee BIGINT NOT NULL REFERENCES users(id), tags TEXT NOT NULL, updated_at TIMESTAMP NOT NULL)`,
		`CREATE INDEX IF NOT EXISTS tasks_org_status ON tasks (org, status, id)`,
	}
	// One transaction for the schema and the seed, behind a lock, so
	// instances starting together on an empty database do not race:
	// CREATE TABLE IF NOT EXISTS is not safe against a concurrent CREATE
	// on PostgreSQL (a duplicate pg_type row), and two seeds would double
	// the data. PostgreSQL: a transaction-scoped advisory lock; SQLite: the
	// write lock the transaction takes as it begins (_txlock=immediate).
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	defer tx.Rollback()
	if s.dialect == "pgx" {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, schemaLock); err != nil {
			return fmt.Errorf("schema lock: %w", err)
		}
	}
	for _, q := range stmts {
		if _, err := tx.ExecContext(ctx, q); err != nil {
			return fmt.Errorf("schema: %w", err)
		}
	}
	if err := s.outbox.Migrate(ctx, tx); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM orgs`).Scan(&n); err != nil {
		return err
	}
	if n == 0 {
		if err := seed(ctx, tx); err != nil {
			return fmt.Errorf("seed: %w", err)
		}
	}
	return tx.Commit()
}

// schemaLock is the advisory lock key behind migrate on PostgreSQL.
const schemaLock = 0x7461736b73 // "tasks"

// seed writes three orgs, a few users each and 1,000 tasks with tags.
func seed(ctx context.Context, tx *sql.Tx) error {
	orgs := []struct{ slug, name string }{{"acme", "Acme Corp"}, {"globex", "Globex"}, {"initech", "Initech"}}
	users := map[string][]int64{}
	roles := []string{"admin", "member", "member", "viewer"}
	names := []string{"Alice", "Bob", "Carol", "Dave"}
	for _, o := range orgs {
		if _, err := tx.ExecContext(ctx, `INSERT INTO orgs (slug, name) VALUES ($1, $2)`, o.slug, o.name); err != nil {
			return err
		}
		for i, role := range roles {
			var id int64
			if err := tx.QueryRowContext(ctx, `INSERT INTO users (org, name, role) VALUES ($1, $2, $3) RETURNING id`,
				o.slug, names[i]+" ("+o.name+")", role).Scan(&id); err != nil {
				return err
			}
			users[o.slug] = append(users[o.slug], id)
		}
	}
	rng := rand.New(rand.NewPCG(42, 42))
	verbs := []string{"Design", "Review", "Ship", "Fix", "Measure", "Document"}
	things := []string{"caching layer", "login page", "billing export", "search index", "dashboard", "rate limiter"}
	tags := []string{"backend", "frontend", "performance", "security", "docs", "ops"}
	now := time.Date(2026, 11, 1, 9, 0, 0, 0, time.UTC)
	for i := 0; i < 1000; i++ {
		o := orgs[i%len(orgs)].slug
		tt, _ := json.Marshal([]string{tags[rng.IntN(len(tags))], tags[rng.IntN(len(tags))]})
		if _, err := tx.ExecContext(ctx, `INSERT INTO tasks (org, title, status, assignee, tags, updated_at) VALUES ($1, $2, $3, $4, $5, $6)`,
			o, verbs[rng.IntN(len(verbs))]+" "+things[rng.IntN(len(things))], statuses[rng.IntN(len(statuses))],
			users[o][rng.IntN(len(users[o]))], string(tt), now.Add(time.Duration(i)*time.Minute)); err != nil {
			return err
		}
	}
	return nil
}

const taskColumns = `id, org, title, status, assignee, tags, updated_at`

func scanTask(row interface{ Scan(...any) error }) (Task, error) {
	var t Task
	var tags string
	if err := row.Scan(&t.ID, &t.Org, &t.Title, &t.Status, &t.Assignee, &tags, &t.UpdatedAt); err != nil {
		return Task{}, err
	}
	if err := json.Unmarshal([]byte(tags), &t.Tags); err != nil {
		return Task{}, fmt.Errorf("task %d: tags: %w", t.ID, err)
	}
	t.UpdatedAt = t.UpdatedAt.UTC()
	return t, nil
}

// GetTask returns one task, or cacheaside.ErrNotFound.
func (s *Store) GetTask(ctx context.Context, id int64) (Task, error) {
	s.query()
	if err := s.sleep(ctx); err != nil {
		return Task{}, err
	}
	t, err := scanTask(s.db.QueryRowContext(ctx, `SELECT `+taskColumns+` FROM tasks WHERE id = $1`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Task{}, cacheaside.ErrNotFound
	}
	return t, err
}

// GetTasks returns the tasks with the given ids that exist, in one query.
func (s *Store) GetTasks(ctx context.Context, ids []int64) (map[int64]Task, error) {
	s.query()
	if err := s.sleep(ctx); err != nil {
		return nil, err
	}
	if len(ids) == 0 {
		return map[int64]Task{}, nil
	}
	args := make([]any, len(ids))
	marks := make([]string, len(ids))
	for i, id := range ids {
		args[i] = id
		marks[i] = "$" + strconv.Itoa(i+1)
	}
	rows, err := s.db.QueryContext(ctx, `SELECT `+taskColumns+` FROM tasks WHERE id IN (`+strings.Join(marks, ", ")+`)`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make(map[int64]Task, len(ids))
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return nil, err
		}
		out[t.ID] = t
	}
	return out, rows.Err()
}

// ListTasks returns one page of an org's tasks, optionally of one
// assignee (0: any) and of one status.
func (s *Store) ListTasks(ctx context.Context, org string, assignee int64, status string, page, size int) (TaskPage, error) {
	s.query()
	if err := s.sleep(ctx); err != nil {
		return TaskPage{}, err
	}
	if ok, err := s.orgExists(ctx, org); err != nil || !ok {
		if err == nil {
			err = errNoOrg
		}
		return TaskPage{}, err
	}
	p := TaskPage{Org: org, Assignee: assignee, Status: status, Page: page, Size: size, Tasks: []Task{}}
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM tasks WHERE org = $1 AND ($2 = '' OR status = $2) AND ($3 = 0 OR assignee = $3)`,
		org, status, assignee).Scan(&p.Total); err != nil {
		return TaskPage{}, err
	}
	rows, err := s.db.QueryContext(ctx, `SELECT `+taskColumns+` FROM tasks WHERE org = $1 AND ($2 = '' OR status = $2) AND ($3 = 0 OR assignee = $3)
		ORDER BY id LIMIT $4 OFFSET $5`, org, status, assignee, size, (page-1)*size)
	if err != nil {
		return TaskPage{}, err
	}
	defer rows.Close()
	for rows.Next() {
		t, err := scanTask(rows)
		if err != nil {
			return TaskPage{}, err
		}
		p.Tasks = append(p.Tasks, t)
	}
	return p, rows.Err()
}

func (s *Store) orgExists(ctx context.Context, org string) (bool, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM orgs WHERE slug = $1`, org).Scan(&n)
	return n > 0, err
}

// OrgStats computes the dashboard aggregates of one org.
func (s *Store) OrgStats(ctx context.Context, org string) (OrgStats, error) {
	s.query()
	if err := s.sleep(ctx); err != nil {
		return OrgStats{}, err
	}
	if ok, err := s.orgExists(ctx, org); err != nil || !ok {
		if err == nil {
			err = cacheaside.ErrNotFound
		}
		return OrgStats{}, err
	}
	st := OrgStats{Org: org, ByStatus: map[string]int{}, Computed: time.Now().UTC()}
	rows, err := s.db.QueryContext(ctx, `SELECT status, COUNT(*) FROM tasks WHERE org = $1 GROUP BY status`, org)
	if err != nil {
		return OrgStats{}, err
	}
	defer rows.Close()
	for rows.Next() {
		var status string
		var n int
		if err := rows.Scan(&status, &n); err != nil {
			return OrgStats{}, err
		}
		st.ByStatus[status] = n
		st.Total += n
	}
	return st, rows.Err()
}

// CreateTask inserts a task and returns it.
func (s *Store) CreateTask(ctx context.Context, in TaskInput) (t Task, ch change, rec cacheoutbox.Receipt, _ error) {
	s.query()
	ch, rec, err := s.write(ctx, func(tx *sql.Tx) (change, error) {
		if ok, err := userInOrg(ctx, tx, in.Assignee, in.Org); err != nil || !ok {
			if err == nil {
				err = invalidf("assignee %d is not a user of org %s", in.Assignee, short(in.Org))
			}
			return change{}, err
		}
		tags, _ := json.Marshal(in.Tags)
		var err error
		t, err = scanTask(tx.QueryRowContext(ctx, `INSERT INTO tasks (org, title, status, assignee, tags, updated_at)
			VALUES ($1, $2, $3, $4, $5, $6) RETURNING `+taskColumns, in.Org, in.Title, in.Status, in.Assignee, string(tags), time.Now().UTC()))
		return change{t.ID, t.Org, []int64{t.Assignee}}, err
	})
	return t, ch, rec, err
}

// write runs fn, a task's change, in a transaction with its invalidations
// recorded in the outbox (lecture 4.3, made durable: a process that dies
// after the commit leaves them to the relay), and commits.
func (s *Store) write(ctx context.Context, fn func(tx *sql.Tx) (change, error)) (change, cacheoutbox.Receipt, error) {
	var rec cacheoutbox.Receipt
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return change{}, rec, err
	}
	defer tx.Rollback()
	ch, err := fn(tx)
	if err != nil {
		return change{}, rec, err
	}
	if s.targets != nil {
		if rec, err = s.outbox.Record(ctx, tx, s.targets(ch)...); err != nil {
			return change{}, rec, err
		}
	}
	return ch, rec, tx.Commit()
}

// UpdateTask replaces a task's fields (not its org) and returns it, or
// cacheaside.ErrNotFound.
func (s *Store) UpdateTask(ctx context.Context, id int64, in TaskInput) (t Task, ch change, rec cacheoutbox.Receipt, _ error) {
	s.query()
	ch, rec, err := s.write(ctx, func(tx *sql.Tx) (change, error) {
		cur, err := scanTask(tx.QueryRowContext(ctx, `SELECT `+taskColumns+` FROM tasks WHERE id = $1`, id))
		if errors.Is(err, sql.ErrNoRows) {
			return change{}, cacheaside.ErrNotFound
		}
		if err != nil {
			return change{}, err
		}
		if in.Org != "" && in.Org != cur.Org {
			return change{}, invalidf("a task cannot move to another org")
		}
		if ok, err := userInOrg(ctx, tx, in.Assignee, cur.Org); err != nil || !ok {
			if err == nil {
				err = invalidf("assignee %d is not a user of org %s", in.Assignee, short(cur.Org))
			}
			return change{}, err
		}
		tags, _ := json.Marshal(in.Tags)
		t, err = scanTask(tx.QueryRowContext(ctx, `UPDATE tasks SET title = $1, status = $2, assignee = $3, tags = $4, updated_at = $5
			WHERE id = $6 RETURNING `+taskColumns, in.Title, in.Status, in.Assignee, string(tags), time.Now().UTC(), id))
		if errors.Is(err, sql.ErrNoRows) {
			return change{}, cacheaside.ErrNotFound
		}
		ch := change{t.ID, t.Org, []int64{cur.Assignee}}
		if t.Assignee != cur.Assignee {
			ch.assignees = append(ch.assignees, t.Assignee)
		}
		return ch, err
	})
	return t, ch, rec, err
}

// DeleteTask deletes a task and returns what it touched, or
// cacheaside.ErrNotFound.
func (s *Store) DeleteTask(ctx context.Context, id int64) (change, cacheoutbox.Receipt, error) {
	s.query()
	return s.write(ctx, func(tx *sql.Tx) (change, error) {
		ch := change{id: id, assignees: make([]int64, 1)}
		err := tx.QueryRowContext(ctx, `DELETE FROM tasks WHERE id = $1 RETURNING org, assignee`, id).Scan(&ch.org, &ch.assignees[0])
		if errors.Is(err, sql.ErrNoRows) {
			return change{}, cacheaside.ErrNotFound
		}
		return ch, err
	})
}

// userInOrg reads through q: the write's transaction (on SQLite, with its
// one connection, a read beside the transaction would wait for it).
func userInOrg(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, user int64, org string) (bool, error) {
	var n int
	err := q.QueryRowContext(ctx, `SELECT COUNT(*) FROM users WHERE id = $1 AND org = $2`, user, org).Scan(&n)
	return n > 0, err
}

// Permissions are what one user may do.
type Permissions struct {
	User  int64    `json:"user_id"`
	Org   string   `json:"org"`
	Role  string   `json:"role"`
	Can   []string `json:"can"`
	Fresh string   `json:"source"`
}

// UserPermissions reads a user's role and what it allows, or
// cacheaside.ErrNotFound.
func (s *Store) UserPermissions(ctx context.Context, user int64) (Permissions, error) {
	s.query()
	p := Permissions{User: user, Fresh: "database"}
	err := s.db.QueryRowContext(ctx, `SELECT org, role FROM users WHERE id = $1`, user).Scan(&p.Org, &p.Role)
	if errors.Is(err, sql.ErrNoRows) {
		return Permissions{}, cacheaside.ErrNotFound
	}
	if err != nil {
		return Permissions{}, err
	}
	switch p.Role {
	case "admin":
		p.Can = []string{"read", "write", "delete", "admin"}
	case "member":
		p.Can = []string{"read", "write"}
	default:
		p.Can = []string{"read"}
	}
	return p, nil
}

// Ping checks the database.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }
