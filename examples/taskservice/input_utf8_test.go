package main

import (
	"testing"
)

// input.go promises "text fields must be valid UTF-8", but encoding/json
// replaces invalid bytes with U+FFFD before validate sees them: the task
// is stored with a mangled title instead of a 400. Format characters
// (bidi overrides, zero-width) pass the control-character check too.
func TestInvalidUTF8Refused(t *testing.T) {
	ta := newTestApp(t, nil)
	for name, title := range map[string]string{"invalid UTF-8": "bad \xff byte", "lone surrogate": `bad \ud800 escape`} {
		code, b := ta.do(t, "POST", "/tasks", `{"org":"acme","title":"`+title+`","status":"todo","assignee_id":1}`)
		if code != 400 {
			t.Errorf("%s title: %d %s, want 400", name, code, b)
		}
	}
	code, b := ta.do(t, "POST", "/tasks", `{"org":"acme","title":"invoice \u202Efdp.exe","status":"todo","assignee_id":1}`)
	t.Logf("bidi override (U+202E) title: %d %s", code, b)
}
