package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Input handling, one set of rules for every endpoint:
//
//   - a body over maxBody bytes is refused with 413 before it is parsed;
//   - every invalid field gets a 400 with a short message that names the
//     field and quotes at most quoteLen characters of what was sent;
//   - text fields must be valid UTF-8 (invalid bytes and unpaired
//     surrogate escapes, which encoding/json turns into U+FFFD, are
//     refused) without control characters (NUL, newlines, escapes: refused
//     alike on SQLite and PostgreSQL) or bidirectional overrides, and
//     their limits count characters, not bytes.

// maxBody is the largest request body accepted.
const maxBody = 64 << 10

// Text limits, in characters.
const (
	maxTitle = 200
	maxOrg   = 64
	maxTag   = 32
	maxTags  = 10
	quoteLen = 32
)

// errInvalid marks input the API rejects with 400.
type errInvalid struct{ msg string }

func (e errInvalid) Error() string { return e.msg }

func invalidf(format string, args ...any) error { return errInvalid{fmt.Sprintf(format, args...)} }

// short quotes s for an error message, cut to quoteLen characters.
func short(s string) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if utf8.RuneCountInString(s) <= quoteLen {
		return strconv.Quote(s)
	}
	n := 0
	for i := range s {
		if n == quoteLen {
			return strconv.Quote(s[:i]) + "…"
		}
		n++
	}
	return strconv.Quote(s)
}

// text checks a text field: required or not, at most max characters,
// valid UTF-8, no control characters.
func text(field, s string, max int, required bool) error {
	switch {
	case s == "" && required:
		return invalidf("%s is required", field)
	case !utf8.ValidString(s):
		return invalidf("%s is not valid UTF-8", field)
	case utf8.RuneCountInString(s) > max:
		return invalidf("%s is longer than %d characters", field, max)
	}
	for _, r := range s {
		switch {
		case unicode.IsControl(r):
			return invalidf("%s contains a control character (%U)", field, r)
		case r == utf8.RuneError:
			// What encoding/json makes of invalid UTF-8 and of a lone
			// surrogate escape: refused, not stored mangled.
			return invalidf("%s contains invalid UTF-8 or an unpaired surrogate (%U)", field, r)
		case r >= 0x202A && r <= 0x202E, r >= 0x2066 && r <= 0x2069:
			// Bidirectional overrides and isolates make text display in
			// another order than it is stored ("invoice\u202Efdp.exe").
			return invalidf("%s contains a bidirectional control character (%U)", field, r)
		}
	}
	return nil
}

// checkOrg validates an org name wherever it comes from.
func checkOrg(org string) error { return text("org", org, maxOrg, true) }

// pathID parses a positive integer path value.
func pathID(r *http.Request, name string) (int64, error) {
	s := r.PathValue(name)
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, invalidf("%s %s is not a positive integer", name, short(s))
	}
	return id, nil
}

func intParam(s string, def, lo, hi int, name string) (int, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		return 0, invalidf("%s %s must be an integer from %d to %d", name, short(s), lo, hi)
	}
	return n, nil
}

// decode reads a JSON body strictly: one object, known fields only, at
// most maxBody bytes (a larger body is an *http.MaxBytesError: 413).
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	if r.ContentLength > maxBody {
		return &http.MaxBytesError{Limit: maxBody}
	}
	body := http.MaxBytesReader(w, r.Body, maxBody)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return tooBig
		}
		// A body of unknown length that is not JSON fails at its first
		// bytes: it is still 413 if it is too large, as promised.
		if _, derr := io.Copy(io.Discard, body); errors.As(derr, &tooBig) {
			return tooBig
		}
		return invalidf("malformed JSON body: %s", jsonProblem(err))
	}
	if dec.More() {
		return invalidf("malformed JSON body: more than one value")
	}
	if _, err := dec.Token(); err != io.EOF {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return tooBig
		}
		return invalidf("malformed JSON body: data after the object")
	}
	return nil
}

// jsonProblem describes a decoding error without echoing the input.
func jsonProblem(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.Is(err, io.EOF):
		return "empty body"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "unexpected end of input"
	case errors.As(err, &syn):
		return fmt.Sprintf("syntax error at byte %d", syn.Offset)
	case errors.As(err, &typ):
		return fmt.Sprintf("field %s must be a %s", short(typ.Field), typ.Type)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return "unknown field " + short(strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`))
	}
	return "not a JSON object"
}

// TaskInput is the body of a create or update.
type TaskInput struct {
	Org      string   `json:"org"`
	Title    string   `json:"title"`
	Status   string   `json:"status"`
	Assignee int64    `json:"assignee_id"`
	Tags     []string `json:"tags"`
}

// validate checks a task body; org is required only on create (an update
// cannot move a task).
func (in *TaskInput) validate(create bool) error {
	in.Title = strings.TrimSpace(in.Title)
	if create || in.Org != "" { // an update may repeat the task's org, not change it (Store.UpdateTask)
		if err := checkOrg(in.Org); err != nil {
			return err
		}
	}
	if err := text("title", in.Title, maxTitle, true); err != nil {
		return err
	}
	if !validStatus(in.Status) {
		return invalidf("status %s is not one of %s", short(in.Status), strings.Join(statuses, ", "))
	}
	if in.Assignee <= 0 {
		return invalidf("assignee_id is required")
	}
	if len(in.Tags) > maxTags {
		return invalidf("at most %d tags", maxTags)
	}
	for i, tag := range in.Tags {
		if err := text(fmt.Sprintf("tags[%d]", i), tag, maxTag, true); err != nil {
			return err
		}
	}
	if in.Tags == nil {
		in.Tags = []string{}
	}
	return nil
}
