from competency_gaps.cli import main

main()
