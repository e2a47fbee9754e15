from ar_course.cli import main

raise SystemExit(main())
