-- A token made for replacing a named node's certificate (`enroll-token create --replace NODE`):
-- it enrolls only that node, and only it may enroll a name that already has a certificate.
ALTER TABLE enroll_tokens ADD COLUMN replaces TEXT;
